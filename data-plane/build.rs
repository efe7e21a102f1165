//! Generates the data APIs' messages and tonic services (`prism.data.v1`),
//! compiled with protox (no system `protoc`) from `proto/prism/data/v1/`.
//! The contract crate, prism-proto, knows no tonic: the services live here,
//! with the proxy that serves them.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let file = "prism/data/v1/data.proto";
    println!("cargo:rerun-if-changed=../proto/{file}");
    let descriptors = protox::compile([file], ["../proto"])?;
    tonic_prost_build::configure()
        .build_server(true)
        .build_client(true)
        // Values and payloads as `Bytes`: handed to the store without a copy.
        .bytes(".prism.data.v1")
        .compile_fds(descriptors)?;
    Ok(())
}
