"""The codec: any picklable object as a small envelope plus binaries in an arena."""
