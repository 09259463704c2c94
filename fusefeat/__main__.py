from fusefeat.cli import main

main()
