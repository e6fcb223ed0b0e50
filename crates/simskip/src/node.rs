//! Assembly of the coordinator and client daemons (filled in with the federation library).
