//! Block orders: any order, priority order (work in progress).
