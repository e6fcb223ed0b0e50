//! simskip-kge
