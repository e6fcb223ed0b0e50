//! Client-side federated work.
