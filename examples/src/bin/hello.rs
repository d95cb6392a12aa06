//! `hello --id ID --port PORT`: the tiny HTTP service minipaas runs. Run by a keelson
//! driver, it takes both from the environment the driver sets (`KEELSON_TASK_ID`, `PORT`).

use clap::Parser;

/// A tiny HTTP service: `hello from <id>`.
#[derive(Parser, Debug)]
struct Args {
    /// Instance id to answer with.
    #[arg(long, env = "KEELSON_TASK_ID")]
    id: String,
    /// Port to listen on (127.0.0.1).
    #[arg(long, env = "PORT")]
    port: u16,
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> std::io::Result<()> {
    let args = Args::parse();
    keelson_examples::hello::serve(args.id, ([127, 0, 0, 1], args.port).into()).await
}
