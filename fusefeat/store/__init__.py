"""The output directory: HDF5 shards committed atomically, a manifest, and readers.

    DIR/fusefeat.json                        the run manifest (fingerprint, options)
    DIR/shard-p0000of0001-<run>-000001.h5    committed shards, never modified again
    DIR/.tmp.shard-...h5                     the shard being written (ignored by readers)
    DIR/parts/p0000of0001.json               what each part (--shard I/N) last reported
    DIR/quarantine/                          shards found damaged (moved aside, then redone)
"""
