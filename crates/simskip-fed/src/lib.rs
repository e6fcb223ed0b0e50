//! simskip-fed
