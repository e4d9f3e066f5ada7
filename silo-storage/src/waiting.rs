//! Waiting cache for the destination side (work in progress).
