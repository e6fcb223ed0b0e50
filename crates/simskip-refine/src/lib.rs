//! simskip-refine
