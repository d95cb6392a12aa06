//! The controller's dashboard: server-rendered HTML, read-only, no script. `/` lists the
//! apps; `/apps/<app>` shows one: its services, the releases timeline, its instances
//! with their health, and its recent output. Values come from the same [`Platform`]
//! calls as the API's, so the page and `GET /v1/...` agree; secrets appear by name only.

use bytes::Bytes;
use futures::StreamExt;
use http_body_util::{BodyExt, Full};

use super::api::LogdAccess;
use super::platform::{Platform, PlatformError};

type Response = hyper::Response<http_body_util::combinators::BoxBody<Bytes, std::convert::Infallible>>;

/// Lines of recent output an app's page shows.
const RECENT_LINES: usize = 50;

fn page(status: u16, title: &str, body: &str) -> Response {
    let html = format!(
        "<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>{} · minipaas</title>\
         <style>body{{font:14px system-ui,sans-serif;margin:2em}}table{{border-collapse:collapse;margin-bottom:1.5em}}\
         td,th{{border:1px solid #ccc;padding:.3em .6em;text-align:left}}.healthy{{color:#070}}.unhealthy{{color:#a00}}\
         pre{{background:#f6f6f6;padding:1em;overflow:auto}}</style></head>\
         <body><p><a href=\"/\">minipaas</a></p><h1>{}</h1>\n{body}</body></html>\n",
        escape(title),
        escape(title)
    );
    let mut r = hyper::Response::new(Full::new(Bytes::from(html)).boxed());
    *r.status_mut() = hyper::StatusCode::from_u16(status).unwrap_or(hyper::StatusCode::INTERNAL_SERVER_ERROR);
    r.headers_mut().insert(hyper::header::CONTENT_TYPE, hyper::header::HeaderValue::from_static("text/html; charset=utf-8"));
    r
}

fn failed(e: PlatformError) -> Response {
    page(e.status(), "error", &format!("<p id=\"error\">{}</p>", escape(&e.to_string())))
}

/// HTML-escapes text for element content and quoted attributes.
pub fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

fn time(ms: u64) -> String {
    humantime::format_rfc3339_seconds(std::time::UNIX_EPOCH + std::time::Duration::from_millis(ms)).to_string()
}

/// `/`: every app.
pub async fn index(platform: &Platform) -> Response {
    let apps = match platform.apps.list().await {
        Ok(a) => a,
        Err(e) => return failed(e.into()),
    };
    let mut rows = String::new();
    for app in &apps {
        let services = app.parsed().map(|m| m.services.into_keys().collect::<Vec<_>>().join(", ")).unwrap_or_default();
        rows.push_str(&format!(
            "<tr class=\"app\" data-app=\"{0}\"><td><a href=\"/apps/{0}\">{0}</a></td><td>{1}</td><td>{2}</td><td>{3}</td></tr>\n",
            escape(&app.name),
            escape(&services),
            escape(&app.created_by),
            time(app.created_ms)
        ));
    }
    let body = if apps.is_empty() {
        "<p id=\"no-apps\">No apps yet: <code>minipaas apps create &lt;name&gt;</code>.</p>".to_owned()
    } else {
        format!("<table id=\"apps\"><tr><th>app</th><th>services</th><th>created by</th><th>created</th></tr>\n{rows}</table>")
    };
    page(200, "apps", &body)
}

/// `/apps/<app>`: one app.
pub async fn app(platform: &Platform, name: &str, logd: Option<&LogdAccess>) -> Response {
    let info = match platform.info(name).await {
        Ok(i) => i,
        Err(e) => return failed(e),
    };
    let timeline = match platform.timeline(name).await {
        Ok(t) => t,
        Err(e) => return failed(e),
    };
    let instances = match platform.ps(name).await {
        Ok(p) => p,
        Err(e) => return failed(e),
    };
    let mut body =
        String::from("<h2>Services</h2><table id=\"services\"><tr><th>service</th><th>release</th><th>tasks</th><th>domains</th></tr>\n");
    for s in &info.services {
        body.push_str(&format!(
            "<tr class=\"service\" data-service=\"{0}\"><td>{0}</td><td>v{1}{2}</td><td>{3}</td><td>{4}</td></tr>\n",
            escape(&s.name),
            s.release,
            s.rolling_out.map(|v| format!(" (v{v} rolling out)")).unwrap_or_default(),
            s.count,
            escape(&s.domains.join(", "))
        ));
    }
    body.push_str("</table><h2>Releases</h2><table id=\"releases\"><tr><th>service</th><th>release</th><th>image</th><th>by</th><th>when</th><th>change</th></tr>\n");
    for r in timeline.iter().rev() {
        body.push_str(&format!(
            "<tr class=\"release{}\" data-service=\"{}\" data-release=\"{}\"><td>{}</td><td>v{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>\n",
            if r.current { " current" } else { "" },
            escape(&r.service),
            r.version,
            escape(&r.service),
            r.version,
            escape(&r.image),
            escape(&r.by),
            time(r.at_ms),
            escape(&r.change)
        ));
    }
    body.push_str("</table><h2>Instances</h2><table id=\"instances\"><tr><th>instance</th><th>service</th><th>release</th><th>node</th><th>status</th><th>health</th><th>address</th></tr>\n");
    for i in &instances {
        body.push_str(&format!(
            "<tr class=\"instance\" data-id=\"{0}\" data-healthy=\"{5}\"><td>{0}</td><td>{1}</td><td>v{2}</td><td>{3}</td><td>{4}</td><td class=\"{6}\">{6}</td><td>{7}</td></tr>\n",
            escape(&i.id),
            escape(&i.service),
            i.release,
            escape(&i.node),
            escape(&i.status),
            i.healthy,
            if i.healthy { "healthy" } else { "unhealthy" },
            escape(i.address.as_deref().unwrap_or("-"))
        ));
    }
    body.push_str("</table>");
    body.push_str(&format!(
        "<h2>Config and secrets</h2><p id=\"config-keys\">config: {}</p><p id=\"secret-names\">secrets: {}</p>",
        escape(&info.config_keys.join(", ")),
        escape(&info.secrets.join(", "))
    ));
    body.push_str("<h2>Recent output</h2><pre id=\"logs\">");
    body.push_str(&escape(&recent_output(name, logd).await));
    body.push_str("</pre>");
    page(200, name, &body)
}

async fn recent_output(app: &str, logd: Option<&LogdAccess>) -> String {
    let Some(logd) = logd else { return "(no log server)".into() };
    let query = crate::logs_client::LogQuery { service: format!("{app}*"), tail: Some(RECENT_LINES), ..Default::default() };
    let body = match crate::logs_client::open(&query, &logd.base, logd.token.as_deref()).await {
        Ok(b) => b,
        Err(e) => return format!("(logs unavailable: {e})"),
    };
    let lines: Vec<String> = crate::logs_client::records(body)
        .map(|r| match r {
            Ok(r) => format!("{} {} {}", humantime::format_rfc3339_seconds(r.timestamp), r.instance(), r.line),
            Err(e) => e,
        })
        .collect()
        .await;
    lines.join("\n")
}
