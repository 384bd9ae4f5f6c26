//! The HTTP side of the bouncer: one `GET /v1/decisions/stream` per pull, with the
//! bouncer's key in `X-Api-Key`, over plain HTTP/1.1 to the local API.

use std::{env, fmt, fs, time::Duration};

use http::{HeaderValue, Request, StatusCode, Uri, header};
use http_body_util::{BodyExt, Empty, Limited};
use hyper::body::Bytes;
use hyper_util::{
    client::legacy::{Client, connect::HttpConnector},
    rt::TokioExecutor,
};

use super::decisions::DecisionStream;
use crate::config::ApiKey;

/// How long a connect may take: the LAPI is local.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a whole pull may take, the first one's full list included.
const PULL_TIMEOUT: Duration = Duration::from_secs(30);
/// The largest answer read: a startup list of about a quarter of a million decisions
/// (what the blocklists hold) at some 250 bytes each.
const MAX_ANSWER: usize = 64 << 20;

/// Why the key could not be read; the message says what to do.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error(
        "[crowdsec] api_key_file {path}: {what}: put the key `cscli bouncers add kgate` \
         printed in it (readable by root)"
    )]
    File { path: String, what: String },
    #[error(
        "[crowdsec] api_key_env: the environment variable {name} {what}: set it to the key \
         `cscli bouncers add kgate` printed (systemd: Environment= or EnvironmentFile= in a \
         drop-in)"
    )]
    Env { name: String, what: String },
}

/// Reads the bouncer's API key from where the configuration says.
pub fn read_key(source: &ApiKey) -> Result<HeaderValue, KeyError> {
    let bad = |what: &str| match source {
        ApiKey::File(path) => KeyError::File {
            path: path.display().to_string(),
            what: what.to_owned(),
        },
        ApiKey::Env(name) => KeyError::Env {
            name: name.clone(),
            what: what.to_owned(),
        },
    };
    let text = match source {
        ApiKey::File(path) => fs::read_to_string(path).map_err(|e| bad(&e.to_string()))?,
        ApiKey::Env(name) => env::var(name).map_err(|e| {
            bad(match e {
                env::VarError::NotPresent => "is not set",
                env::VarError::NotUnicode(_) => "is not text",
            })
        })?,
    };
    let key = text.trim();
    if key.is_empty() || key.contains(char::is_whitespace) {
        return Err(bad("is empty or holds more than one word"));
    }
    let mut value = HeaderValue::from_str(key).map_err(|_| bad("holds characters a key cannot"))?;
    value.set_sensitive(true);
    Ok(value)
}

/// Why a pull failed, as the log and `kgate status` say it.
#[derive(Debug)]
pub enum PullError {
    /// No TCP connection (refused, unreachable, timed out).
    Connect(String),
    /// No whole answer within [`PULL_TIMEOUT`].
    Timeout,
    /// Connected, but the exchange broke off.
    Http(String),
    /// An answer other than 200.
    Status(StatusCode, String),
    /// A 200 whose body is not a decision stream.
    Body(String),
}

impl fmt::Display for PullError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PullError::Connect(e) => write!(
                f,
                "cannot connect: {e} (is crowdsec running, with its LAPI at this url?)"
            ),
            PullError::Timeout => write!(f, "no answer within {}s", PULL_TIMEOUT.as_secs()),
            PullError::Http(e) => write!(f, "the exchange failed: {e}"),
            PullError::Status(status, message) if *status == StatusCode::FORBIDDEN => write!(
                f,
                "the LAPI refused the key ({status}{message}): `cscli bouncers list` shows the \
                 bouncers it knows; make one with `cscli bouncers add kgate` and put its key in \
                 api_key_file"
            ),
            PullError::Status(status, message) => {
                write!(f, "the LAPI answered {status}{message}")
            }
            PullError::Body(e) => write!(f, "the answer is not a decision stream: {e}"),
        }
    }
}

/// A client of one LAPI, with one bouncer's key.
pub struct Lapi {
    client: Client<HttpConnector, Empty<Bytes>>,
    stream: String,
    key: HeaderValue,
}

impl Lapi {
    pub fn new(base: &Uri, key: HeaderValue) -> Lapi {
        let mut connector = HttpConnector::new();
        connector.set_connect_timeout(Some(CONNECT_TIMEOUT));
        connector.set_nodelay(true);
        let base = base.to_string();
        Lapi {
            client: Client::builder(TokioExecutor::new()).build(connector),
            stream: format!("{}/v1/decisions/stream", base.trim_end_matches('/')),
            key,
        }
    }

    /// One pull: with `startup`, every active decision; else what changed since the
    /// previous pull of this bouncer (the LAPI keeps track).
    pub async fn pull(&self, startup: bool) -> Result<DecisionStream, PullError> {
        // Only what an XDP blocklist can apply: bans of addresses and ranges.
        let query = if startup {
            "?startup=true&scopes=ip,range"
        } else {
            "?scopes=ip,range"
        };
        let request = Request::get(format!("{}{query}", self.stream))
            .header("X-Api-Key", self.key.clone())
            .header(
                header::USER_AGENT,
                concat!("kgate/", env!("CARGO_PKG_VERSION")),
            )
            .body(Empty::new())
            .map_err(|e| PullError::Http(e.to_string()))?;
        let exchange = async {
            let response = self.client.request(request).await.map_err(|e| {
                if e.is_connect() {
                    PullError::Connect(innermost(&e))
                } else {
                    PullError::Http(innermost(&e))
                }
            })?;
            let status = response.status();
            let body = Limited::new(response.into_body(), MAX_ANSWER)
                .collect()
                .await
                .map_err(|e| PullError::Http(e.to_string()))?
                .to_bytes();
            Ok::<_, PullError>((status, body))
        };
        let (status, body) = tokio::time::timeout(PULL_TIMEOUT, exchange)
            .await
            .map_err(|_| PullError::Timeout)??;
        if status != StatusCode::OK {
            // The LAPI explains itself in {"message": "..."}.
            let message = serde_json::from_slice::<serde_json::Value>(&body)
                .ok()
                .and_then(|v| v.get("message")?.as_str().map(|m| format!(", {m}")))
                .unwrap_or_default();
            return Err(PullError::Status(status, message));
        }
        serde_json::from_slice(&body).map_err(|e| PullError::Body(e.to_string()))
    }
}

/// The deepest cause of an error: "Connection refused (os error 111)", not hyper's
/// "client error (Connect)".
fn innermost(error: &(dyn std::error::Error + 'static)) -> String {
    let mut cause = error;
    while let Some(next) = cause.source() {
        cause = next;
    }
    cause.to_string()
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use tokio::{
        io::{AsyncReadExt, AsyncWriteExt},
        net::TcpListener,
    };

    use super::*;

    /// A one-shot HTTP server: answers the first request with `status` and `body`,
    /// hands back the request it read.
    async fn serve_once(status: &str, body: &str) -> (Uri, tokio::task::JoinHandle<String>) {
        let response = format!(
            "HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        );
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url: Uri = format!("http://{}/", listener.local_addr().unwrap())
            .parse()
            .unwrap();
        let server = tokio::spawn(async move {
            let (mut stream, _) = listener.accept().await.unwrap();
            let mut request = Vec::new();
            let mut buf = [0u8; 4096];
            while !request.windows(4).any(|w| w == b"\r\n\r\n") {
                let n = stream.read(&mut buf).await.unwrap();
                if n == 0 {
                    break;
                }
                request.extend_from_slice(&buf[..n]);
            }
            stream.write_all(response.as_bytes()).await.unwrap();
            String::from_utf8(request).unwrap()
        });
        (url, server)
    }

    fn key(text: &str) -> HeaderValue {
        HeaderValue::from_str(text).unwrap()
    }

    #[tokio::test]
    async fn a_pull_sends_the_key_and_reads_the_stream() {
        let (url, server) = serve_once(
            "200 OK",
            r#"{"deleted":null,"new":[{"duration":"3h59m59.5s","id":3,"origin":"cscli","scenario":"manual","scope":"Ip","type":"ban","value":"2001:db8::7"}]}"#,
        )
        .await;
        let stream = Lapi::new(&url, key("secret-key")).pull(true).await.unwrap();
        let request = server.await.unwrap();
        assert!(
            request
                .starts_with("GET /v1/decisions/stream?startup=true&scopes=ip,range HTTP/1.1\r\n"),
            "{request}"
        );
        assert!(
            request
                .to_ascii_lowercase()
                .contains("x-api-key: secret-key\r\n"),
            "{request}"
        );
        let new = stream.new.unwrap();
        assert_eq!(new.len(), 1);
        assert_eq!(new[0].value, "2001:db8::7");
        assert!(stream.deleted.is_none());
    }

    #[tokio::test]
    async fn a_refused_key_and_a_missing_lapi_say_what_to_do() {
        let (url, _server) = serve_once("403 Forbidden", r#"{"message":"access forbidden"}"#).await;
        let error = Lapi::new(&url, key("wrong")).pull(false).await.unwrap_err();
        assert!(
            error
                .to_string()
                .starts_with("the LAPI refused the key (403 Forbidden, access forbidden)"),
            "{error}"
        );

        // Nothing listens there any more.
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let url: Uri = format!("http://{}", listener.local_addr().unwrap())
            .parse()
            .unwrap();
        drop(listener);
        let error = Lapi::new(&url, key("k")).pull(true).await.unwrap_err();
        assert!(matches!(error, PullError::Connect(_)), "{error:?}");
        assert!(
            error.to_string().contains("refused")
                && error.to_string().contains("is crowdsec running"),
            "{error}"
        );
    }

    #[tokio::test]
    async fn an_answer_that_is_not_a_stream_is_an_error() {
        let (url, _server) = serve_once("200 OK", "not json!").await;
        let error = Lapi::new(&url, key("k")).pull(true).await.unwrap_err();
        assert!(
            error
                .to_string()
                .starts_with("the answer is not a decision stream"),
            "{error}"
        );
    }

    #[test]
    fn the_key_is_read_trimmed_and_a_bad_one_is_refused() {
        let dir = std::env::temp_dir().join(format!("kgate-crowdsec-key-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let file = dir.join("key");
        fs::write(&file, "1b2fb57f3b30f0f4c3f62f11f8645b24\n").unwrap();
        let read = read_key(&ApiKey::File(file.clone())).unwrap();
        assert_eq!(read.as_bytes(), b"1b2fb57f3b30f0f4c3f62f11f8645b24");
        assert!(read.is_sensitive());

        fs::write(&file, "\n").unwrap();
        let message = read_key(&ApiKey::File(file.clone()))
            .unwrap_err()
            .to_string();
        assert!(
            message.contains("is empty") && message.contains("cscli bouncers add"),
            "{message}"
        );
        let missing = PathBuf::from("/nonexistent/kgate-key");
        let message = read_key(&ApiKey::File(missing)).unwrap_err().to_string();
        assert!(
            message.starts_with("[crowdsec] api_key_file /nonexistent/kgate-key: No such file"),
            "{message}"
        );
        let message = read_key(&ApiKey::Env("KGATE_TEST_SURELY_UNSET_KEY".into()))
            .unwrap_err()
            .to_string();
        assert!(
            message.contains("KGATE_TEST_SURELY_UNSET_KEY is not set"),
            "{message}"
        );
        let _ = fs::remove_dir_all(&dir);
    }
}
