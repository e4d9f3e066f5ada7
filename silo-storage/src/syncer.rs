//! Continuous sync of a tracked source to a destination (work in progress).
