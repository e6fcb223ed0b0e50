//! simskip-eval
