"""Model presets (TOML), shipped inside the package as fusefeat.configs."""
