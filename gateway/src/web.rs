//! The browser app, embedded in the gateway binary.
//!
//! What it owns: serving the static files of `gateway/web/` (plain ES
//! modules, one stylesheet, one HTML page; no build step) at `GET /` and
//! `GET /app/<file>`. The files are compiled in with `include_str!`, so the
//! binary is the whole deployment and the page always matches the gateway's
//! protocol. The app talks to the gateway it was loaded from: `POST
//! /dev/login` and `GET /ws` on the same origin (which must be listed in
//! `allowed_origins`).
//!
//! What it does not own: the protocol (the app is a client of
//! PROTOCOL.md like any other) and authentication (the app only holds the
//! token `/dev/login` or an identity provider gave it).

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;

/// One embedded file.
#[derive(Clone, Copy, Debug)]
pub struct Asset {
    /// The URL path it is served at.
    pub path: &'static str,
    pub content_type: &'static str,
    pub body: &'static str,
}

/// Every file of the app, by URL path.
pub const ASSETS: &[Asset] = &[
    Asset {
        path: "/",
        content_type: "text/html; charset=utf-8",
        body: include_str!("../web/index.html"),
    },
    Asset {
        path: "/app/style.css",
        content_type: "text/css; charset=utf-8",
        body: include_str!("../web/style.css"),
    },
    Asset {
        path: "/app/app.js",
        content_type: "text/javascript; charset=utf-8",
        body: include_str!("../web/app.js"),
    },
    Asset {
        path: "/app/client.js",
        content_type: "text/javascript; charset=utf-8",
        body: include_str!("../web/client.js"),
    },
    Asset {
        path: "/app/store.js",
        content_type: "text/javascript; charset=utf-8",
        body: include_str!("../web/store.js"),
    },
];

/// The page may load only its own files and talk only to its own origin.
const CSP: &str = "default-src 'self'; connect-src 'self' ws: wss:; img-src 'self' data:; \
                   style-src 'self'; script-src 'self'; base-uri 'none'; form-action 'self'; \
                   frame-ancestors 'none'";

fn respond(asset: &'static Asset) -> Response {
    let mut resp = (StatusCode::OK, asset.body).into_response();
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static(asset.content_type),
    );
    // Small files that change with the binary: revalidate every time.
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CSP),
    );
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    resp
}

/// The routes of the app: `GET /` and `GET /app/<file>`, for any router state.
pub fn router<S: Clone + Send + Sync + 'static>() -> Router<S> {
    ASSETS.iter().fold(Router::new(), |r, asset| {
        r.route(asset.path, get(move || async move { respond(asset) }))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_module_the_page_imports_is_served() {
        let served: Vec<&str> = ASSETS.iter().map(|a| a.path).collect();
        for asset in ASSETS {
            for line in asset.body.lines() {
                // `import ... from "./x.js"` (modules) and src/href="/app/x" (the page).
                let target = line
                    .split_once("from \"./")
                    .map(|(_, rest)| format!("/app/{}", rest.split('"').next().unwrap_or("")))
                    .or_else(|| {
                        line.split_once("=\"/app/").map(|(_, rest)| {
                            format!("/app/{}", rest.split('"').next().unwrap_or(""))
                        })
                    });
                if let Some(t) = target {
                    assert!(
                        served.contains(&t.as_str()),
                        "{} refers to unserved {t}",
                        asset.path
                    );
                }
            }
        }
    }

    #[test]
    fn the_page_needs_no_favicon_request() {
        // A 404 for /favicon.ico would be a console error in every browser.
        let page = ASSETS[0].body;
        assert!(page.contains("rel=\"icon\" href=\"data:,\""));
    }
}
