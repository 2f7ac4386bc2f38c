//! How a failed S3 request becomes one line: [`Failure`] is what an
//! `object_store` error says (HTTP status, S3 error code and message,
//! retries, whether the endpoint was reached at all), and
//! [`Failure::into_error`] gives the [`Error::Remote`] that names the
//! remote, the operation, the object or bucket, the cause and the fix.
//!
//! `object_store` does not expose its retry error's fields, so the status,
//! the S3 `<Code>` and `<Message>` and the retry count are read from its
//! text; whatever the server sent is cut short and put on one line (it is
//! hostile input like any remote byte).

use object_store::client::{HttpError, HttpErrorKind};

use crate::error::{one_line, Error};

/// Where a request went: for the messages.
pub(super) struct Target<'a> {
    pub(super) remote: &'a str,
    pub(super) endpoint: &'a str,
    pub(super) bucket: &'a str,
}

/// The longest piece of a server's answer put in a message.
const MAX_QUOTE: usize = 200;

/// A refused credential.
#[derive(Debug, PartialEq, Eq)]
enum Denial {
    /// The access key id is unknown.
    UnknownKey,
    /// The secret does not match the key id.
    BadSecret,
}

/// What a failed request says.
#[derive(Debug, Default, PartialEq, Eq)]
pub(super) struct Failure {
    /// `403 Forbidden`.
    status: Option<String>,
    /// The S3 error code (`NoSuchBucket`).
    code: Option<String>,
    /// The S3 error message.
    message: Option<String>,
    /// How many times the request was retried.
    retries: Option<u64>,
    /// The endpoint was not reached (connection refused, timed out).
    unreachable: bool,
    /// The innermost cause's text.
    cause: String,
}

impl Failure {
    /// Reads an `object_store` error.
    pub(super) fn of(e: &object_store::Error) -> Failure {
        let mut f = Failure::parse(&e.to_string());
        let mut source: Option<&(dyn std::error::Error + 'static)> = Some(e);
        while let Some(s) = source {
            if let Some(h) = s.downcast_ref::<HttpError>() {
                f.unreachable |=
                    matches!(h.kind(), HttpErrorKind::Connect | HttpErrorKind::Timeout);
            }
            f.cause = quote(&s.to_string());
            source = s.source();
        }
        if matches!(
            e,
            object_store::Error::PermissionDenied { .. }
                | object_store::Error::Unauthenticated { .. }
        ) && f.status.is_none()
        {
            f.status = Some("403 Forbidden".into());
        }
        f
    }

    /// Reads the text of an error (the parts `object_store` prints).
    fn parse(text: &str) -> Failure {
        let status = after(text, "status code: ").map(|s| {
            let end = s.find(':').unwrap_or(s.len());
            quote(&s[..end])
        });
        let retries = after(text, ", after ")
            .and_then(|s| s.split(' ').next())
            .and_then(|n| n.parse().ok());
        Failure {
            status,
            code: between(text, "<Code>", "</Code>").map(|c| quote(&unescape(c))),
            message: between(text, "<Message>", "</Message>").map(|m| quote(&unescape(m))),
            retries,
            unreachable: false,
            cause: quote(text),
        }
    }

    /// Which credential was refused, where the answer tells: by the S3
    /// code (AWS, MinIO) or, for Garage (whose code is `AccessDenied` for
    /// both), by its message.
    fn denial(&self) -> Option<Denial> {
        let message = self.message.as_deref().unwrap_or_default();
        match self.code.as_deref()? {
            "InvalidAccessKeyId" => Some(Denial::UnknownKey),
            "SignatureDoesNotMatch" => Some(Denial::BadSecret),
            "AccessDenied" if message.contains("No such key") => Some(Denial::UnknownKey),
            "AccessDenied" if message.contains("Invalid signature") => Some(Denial::BadSecret),
            _ => None,
        }
    }

    /// Whether the S3 error code says the bucket does not exist.
    pub(super) fn no_bucket(&self) -> bool {
        self.code.as_deref() == Some("NoSuchBucket")
    }

    /// The one-line error: `remote R: <what> <object>: <cause>; <fix>`.
    pub(super) fn into_error(self, to: &Target, what: &str, object: &str) -> Error {
        let message = format!("{what} {object}: {}", self.explain(to));
        Error::Remote {
            remote: to.remote.to_owned(),
            message,
        }
    }

    /// The cause and the fix.
    fn explain(&self, to: &Target) -> String {
        let tried = match self.retries {
            Some(n) if n > 0 => format!(" (gave up after {n} retries)"),
            _ => String::new(),
        };
        let status = self.status_text();
        let (remote, bucket, endpoint) = (to.remote, to.bucket, to.endpoint);
        if self.unreachable && self.status.is_none() {
            return format!(
                "cannot reach the endpoint {endpoint}: {}{tried}; check the endpoint of remote {remote} (`vmdepot remote list`) and that its S3 service runs and is reachable from this host",
                self.cause
            );
        }
        match self.denial() {
            Some(Denial::UnknownKey) => return format!(
                "{status}: the access key id is unknown to the remote; check AWS_ACCESS_KEY_ID (or aws_access_key_id in the shared credentials file)"
            ),
            Some(Denial::BadSecret) => return format!(
                "{status}: the secret key does not match the access key id; check AWS_SECRET_ACCESS_KEY (or aws_secret_access_key in the shared credentials file)"
            ),
            None => {}
        }
        if self.no_bucket() {
            return format!(
                "{status}: bucket {bucket} does not exist; create it, or fix the URL of remote {remote} (`vmdepot remote remove` and `vmdepot remote add`)"
            );
        }
        if self.status.as_deref().is_some_and(|s| s.starts_with("403")) {
            return format!(
                "{status}: access denied; check the credentials (AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or the shared credentials file) and that the key may read and write bucket {bucket}"
            );
        }
        if self.retries.is_some_and(|n| n > 0) {
            return format!(
                "{status}{tried}; the remote is overloaded or partly down: retry later"
            );
        }
        format!("{status}; see the S3 service's logs")
    }

    /// `403 Forbidden (AccessDenied: message)`, or the cause when the
    /// server said nothing.
    fn status_text(&self) -> String {
        let Some(status) = &self.status else {
            return self.cause.clone();
        };
        match (&self.code, &self.message) {
            (Some(c), Some(m)) => format!("{status} ({c}: {m})"),
            (Some(c), None) => format!("{status} ({c})"),
            _ => status.clone(),
        }
    }
}

/// The text after the first `needle`.
fn after<'t>(text: &'t str, needle: &str) -> Option<&'t str> {
    text.find(needle).map(|i| &text[i + needle.len()..])
}

/// The text between the first `open` and the next `close`.
fn between<'t>(text: &'t str, open: &str, close: &str) -> Option<&'t str> {
    let rest = after(text, open)?;
    rest.find(close).map(|end| &rest[..end])
}

/// XML text with its five entities decoded (`&quot;` is `"`).
fn unescape(xml: &str) -> String {
    [
        ("&quot;", "\""),
        ("&apos;", "'"),
        ("&lt;", "<"),
        ("&gt;", ">"),
    ]
    .iter()
    .fold(xml.to_owned(), |t, (entity, c)| t.replace(entity, c))
    .replace("&amp;", "&")
}

/// A server's text made safe for a message: one line, short.
fn quote(s: &str) -> String {
    let line = one_line(s.trim());
    match line.char_indices().nth(MAX_QUOTE) {
        Some((cut, _)) => format!("{}…", &line[..cut]),
        None => line,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TO: Target = Target {
        remote: "origin",
        endpoint: "http://127.0.0.1:1",
        bucket: "depot",
    };

    fn explain(text: &str) -> String {
        Failure::parse(text)
            .into_error(&TO, "reading", "s3://depot/VMDEPOT")
            .to_string()
    }

    #[test]
    fn credentials_errors_say_which_key() {
        let text = "Generic S3 error: Error performing GET http://x/depot in 2ms - Server returned non-2xx status code: 403 Forbidden: <?xml version=\"1.0\"?><Error><Code>InvalidAccessKeyId</Code><Message>no such key</Message></Error>";
        let msg = explain(text);
        assert!(msg.starts_with("remote origin: reading s3://depot/VMDEPOT: 403 Forbidden (InvalidAccessKeyId: no such key): the access key id is unknown"), "{msg}");
        let msg = explain(&text.replace("InvalidAccessKeyId", "SignatureDoesNotMatch"));
        assert!(msg.contains("the secret key does not match"), "{msg}");
        let msg = explain(&text.replace("InvalidAccessKeyId", "AccessDenied"));
        assert!(
            msg.contains("access denied; check the credentials"),
            "{msg}"
        );
        // Garage says AccessDenied for both, and which in its message.
        let garage = text.replace("InvalidAccessKeyId", "AccessDenied");
        let msg = explain(&garage.replace("no such key", "Forbidden: No such key: GK1"));
        assert!(msg.contains("the access key id is unknown"), "{msg}");
        let msg = explain(&garage.replace("no such key", "Forbidden: Invalid signature"));
        assert!(msg.contains("the secret key does not match"), "{msg}");
    }

    #[test]
    fn missing_bucket_and_retries() {
        let text = "Error performing GET http://x/nope in 2ms - Server returned non-2xx status code: 404 Not Found: <Error><Code>NoSuchBucket</Code><Message>Bucket not found: nope</Message></Error>";
        let f = Failure::parse(text);
        assert!(f.no_bucket());
        let msg = explain(text);
        assert!(
            msg.contains(
                "404 Not Found (NoSuchBucket: Bucket not found: nope): bucket depot does not exist"
            ),
            "{msg}"
        );
        let text = "Error performing PUT http://x/k in 9s, after 6 retries, max_retries: 6, retry_timeout: 150s  - Server returned non-2xx status code: 503 Service Unavailable: <Error><Code>SlowDown</Code></Error>";
        let msg = explain(text);
        assert!(msg.contains("503 Service Unavailable (SlowDown) (gave up after 6 retries); the remote is overloaded"), "{msg}");
        // Garage's quorum message, its XML entities decoded
        let text = text.replace("<Code>SlowDown</Code>", "<Code>ServiceUnavailable</Code><Message>Could not reach quorum of 2 (&quot;dc1&quot; &amp; &lt;2&gt;)</Message>");
        let msg = explain(&text);
        assert!(msg.contains(r#"quorum of 2 ("dc1" & <2>)"#), "{msg}");
    }

    #[test]
    fn hostile_answers_stay_short_and_on_one_line() {
        let long = "x".repeat(10_000);
        let text = format!("status code: 500 Internal\nServer Error: <Code>{long}</Code><Message>a\nb\u{1b}[2J</Message>");
        let msg = explain(&text);
        assert_eq!(msg.lines().count(), 1, "{msg}");
        assert!(msg.len() < 1200, "{}", msg.len());
        assert!(!msg.contains('\u{1b}'));
    }
}
