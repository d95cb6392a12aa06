//! `keelson-cni`: keelson's bridge driver as a CNI plugin (spec 1.1: ADD, DEL, CHECK, GC,
//! STATUS, VERSION). Install it in the runtime's CNI_PATH (`/opt/cni/bin`) and name it
//! in a network configuration's `"type"`; see `keelson_netplumb::cni` for the keys.

use std::collections::HashMap;
use std::io::{Read, Write};

fn main() {
    let vars: HashMap<String, String> = std::env::vars().filter(|(k, _)| k.starts_with("CNI_")).collect();
    let mut stdin = Vec::new();
    if vars.get("CNI_COMMAND").map(String::as_str) != Some("VERSION") {
        let _ = std::io::stdin().read_to_end(&mut stdin);
    }
    let version = serde_json::from_slice::<serde_json::Value>(&stdin)
        .ok()
        .and_then(|v| v["cniVersion"].as_str().map(str::to_owned))
        .unwrap_or_else(|| "1.1.0".to_owned());
    let outcome = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(rt) => rt.block_on(keelson_netplumb::cni::run(&vars, &stdin)),
        Err(e) => Err(keelson_netplumb::cni::CniError { code: 11, msg: "cannot start a runtime".into(), details: e.to_string() }),
    };
    let mut out = std::io::stdout().lock();
    match outcome {
        Ok(Some(result)) => {
            let _ = writeln!(out, "{result}");
        }
        Ok(None) => {}
        Err(e) => {
            let _ = writeln!(out, "{}", e.to_json(&version));
            drop(out);
            std::process::exit(1);
        }
    }
}
