//! The migrator: moves blocks from a tracked source to a destination (work in progress).
