//! `simskip simulate`.
