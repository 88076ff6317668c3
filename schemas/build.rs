//! Generates Rust types from `proto/` with a pure-Rust protobuf compiler (protox), so a fresh
//! machine needs neither `protoc` nor network at build time.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let files = [
        "usage/v1/record.proto",
        "usage/v1/usage.proto",
        "billing/v1/billing.proto",
        "subscription/v1/subscription.proto",
        "payment/v1/payment.proto",
    ];
    let fds = protox::compile(files, ["proto"])?;
    prost_build::Config::new()
        .bytes(["usage.v1.UsageEvent.data_json"])
        .compile_fds(fds)?;
    println!("cargo:rerun-if-changed=proto");
    println!("cargo:rerun-if-changed=migrations");
    Ok(())
}
