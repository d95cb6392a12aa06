//! `hello --id ID --port PORT`: the tiny HTTP service minipaas runs.

use clap::Parser;

/// A tiny HTTP service: `hello from <id>`.
#[derive(Parser, Debug)]
struct Args {
    /// Instance id to answer with.
    #[arg(long)]
    id: String,
    /// Port to listen on (127.0.0.1).
    #[arg(long)]
    port: u16,
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> std::io::Result<()> {
    let args = Args::parse();
    keelson_examples::hello::serve(args.id, ([127, 0, 0, 1], args.port).into()).await
}
