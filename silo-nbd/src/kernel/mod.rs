//! Attaching an export to a Linux `/dev/nbdN` (placeholder, being written).
