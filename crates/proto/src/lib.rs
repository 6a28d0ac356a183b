//! Generated gRPC code for the `sharpsend.cio.v1` package (proto/sharpsend/cio/v1/*.proto).
//!
//! - [`v1`]: messages, `*_server` traits and `*_client` stubs produced by tonic-prost-build.
//! - [`FILE_DESCRIPTOR_SET`]: the encoded descriptors, served by gRPC reflection so grpcurl can
//!   list and describe the services without the .proto files.

/// `sharpsend.cio.v1`: the service's public API.
pub mod v1 {
    #![allow(clippy::all, missing_docs)]
    tonic::include_proto!("sharpsend.cio.v1");
}

/// Encoded `FileDescriptorSet` of every proto file in this package (for reflection).
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("sharpsend_descriptor");
