//! Who may read and who may change: the bearer token, compared in constant time; read-only
//! pages public unless configured otherwise, changes never without a token.

use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::{StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use super::{App, Failure};

/// Whether the request carries the token, compared in constant time.
pub(super) fn authorized(app: &App, request: &Request) -> bool {
    use subtle::ConstantTimeEq as _;
    let Some(token) = &app.token else {
        return false;
    };
    let given = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or_default();
    bool::from(given.as_bytes().ct_eq(token.expose().as_bytes()))
}

pub(super) async fn read_access(
    State(app): State<Arc<App>>,
    request: Request,
    next: Next,
) -> Response {
    if app.config.reporter.public || authorized(&app, &request) {
        next.run(request).await
    } else {
        unauthorized()
    }
}

pub(super) async fn write_access(
    State(app): State<Arc<App>>,
    request: Request,
    next: Next,
) -> Response {
    if app.token.is_none() {
        return Failure(
            StatusCode::FORBIDDEN,
            "changes are disabled: no reporter token is configured".into(),
        )
        .into_response();
    }
    if authorized(&app, &request) {
        next.run(request).await
    } else {
        unauthorized()
    }
}

pub(super) fn unauthorized() -> Response {
    (
        StatusCode::UNAUTHORIZED,
        [(header::WWW_AUTHENTICATE, "Bearer")],
        "a valid bearer token is required\n",
    )
        .into_response()
}
