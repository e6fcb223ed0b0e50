//! simskip-fed
pub mod proto {
    tonic::include_proto!("simskip.v1");
}
