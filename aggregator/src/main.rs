//! `aggregator` binary. The service itself lands with its own issue; until then the binary only
//! answers `--help` and `--version`, so that the workspace layout and scripts are in place.

use clap::Parser;

#[derive(Debug, Parser)]
#[command(
    name = "aggregator",
    version,
    about = "aggregator service of the metering pipeline (not implemented yet)"
)]
struct Cli {}

fn main() -> anyhow::Result<()> {
    let _cli = Cli::parse();
    anyhow::bail!("aggregator is not implemented yet in this build")
}
