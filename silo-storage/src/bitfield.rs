//! Lock-free fixed-size bitfield (work in progress).
