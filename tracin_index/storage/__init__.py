"""The index on disk and in memory: block plans, principal directions (sketch), encoding, the directory
layout and manifest, the reader that opens and verifies an index, and the factor arrays queries scan."""
