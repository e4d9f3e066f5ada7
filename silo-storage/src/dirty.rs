//! Dirty tracker, split into a local (writer) side and a remote (migrator) side (work in progress).
