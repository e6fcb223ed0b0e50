//! Splitting one knowledge graph into private client folders (FedE's relation split, or
//! random triples).
