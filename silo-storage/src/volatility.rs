//! Volatility monitor: per-block write counts in a sliding window; a block order returning the least volatile block first (work in progress).
