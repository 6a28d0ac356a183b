//! Customer exports (App API) and their download: a handful of requests for any number of
//! people.
//!
//! 1. [`CioClient::create_customer_export`]: `POST /v1/exports/customers` with an audience
//!    filter and the attributes wanted as extra columns. Never retried automatically (a repeat
//!    starts a second export).
//! 2. [`CioClient::get_export`] until [`Export::is_done`] or [`Export::is_failed`].
//! 3. [`CioClient::export_download_url`]: a signed link, on another host, valid 15 minutes.
//! 4. [`CioClient::download_export`] (byte chunks) or [`CioClient::export_rows`] (parsed rows):
//!    a plain GET of that link WITHOUT Customer.io credentials (the App key must not travel to
//!    another host; object stores refuse a second auth mechanism anyway), read chunk by chunk in
//!    bounded memory, with the client's timeout applied to connecting and to each read rather
//!    than to the whole file. Failures are [`DownloadError`]s, which never show the link (its
//!    signature is a credential for the file).
//!
//! The file is CSV with a header row. Customer.io documents no column names; the simulator
//! writes `id,email,cio_id` then the requested attributes. [`ExportRow`] reads columns by
//! header name, so the order does not matter.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::Stream;
use futures::stream::{self, StreamExt as _};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use url::Url;

use crate::client::CioClient;
use crate::csv::{CsvError, CsvReader};
use crate::endpoint::endpoints;
use crate::error::CioError;
use crate::serde_util;

/// An export as `/v1/exports` describes it. Unknown fields are ignored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Export {
    /// Export id.
    #[serde(deserialize_with = "serde_util::i64_lenient")]
    pub id: i64,
    /// `customers` or `deliveries`.
    #[serde(default, rename = "type", deserialize_with = "serde_util::opt_string")]
    pub kind: Option<String>,
    /// Rows in the file; 0 until done.
    #[serde(default, deserialize_with = "serde_util::opt_i64")]
    pub total: Option<i64>,
    /// Done (the project docs' flag; see also `status`).
    #[serde(default, deserialize_with = "serde_util::opt_bool")]
    pub done: Option<bool>,
    /// Failed: will never be downloadable.
    #[serde(default, deserialize_with = "serde_util::opt_bool")]
    pub failed: Option<bool>,
    /// `pending`, `done` or `failed` (the spec's field).
    #[serde(default, deserialize_with = "serde_util::opt_string")]
    pub status: Option<String>,
    /// Description.
    #[serde(default, deserialize_with = "serde_util::opt_string")]
    pub description: Option<String>,
    /// Times the file was downloaded.
    #[serde(default, deserialize_with = "serde_util::opt_i64")]
    pub downloads: Option<i64>,
    /// Unique id, e.g. `"15:1492548073"`.
    #[serde(default, deserialize_with = "serde_util::opt_string")]
    pub deduplicate_id: Option<String>,
    /// Created, unix seconds.
    #[serde(default, deserialize_with = "serde_util::opt_i64")]
    pub created_at: Option<i64>,
    /// Last updated, unix seconds.
    #[serde(default, deserialize_with = "serde_util::opt_i64")]
    pub updated_at: Option<i64>,
}

impl Export {
    /// Ready to download (`done: true` or `status: "done"`), and not failed.
    pub fn is_done(&self) -> bool {
        !self.is_failed() && (self.done == Some(true) || self.status.as_deref() == Some("done"))
    }

    /// Failed (`failed: true` or `status: "failed"`): poll no longer.
    pub fn is_failed(&self) -> bool {
        self.failed == Some(true) || self.status.as_deref() == Some("failed")
    }

    /// Rows in the file (0 until done).
    pub fn rows(&self) -> u64 {
        self.total.and_then(|t| u64::try_from(t).ok()).unwrap_or(0)
    }
}

#[derive(Deserialize)]
struct ExportResponse {
    export: Export,
}

#[derive(Deserialize)]
struct DownloadResponse {
    url: String,
}

#[derive(Serialize)]
struct CreateExport<'a> {
    filters: &'a Value,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    attributes: Vec<&'a str>,
}

/// Why an export file could not be downloaded or read. No variant holds the link.
#[derive(Debug, thiserror::Error)]
pub enum DownloadError {
    /// 403: the link expired (they last 15 minutes: ask for a new one) or its signature was
    /// refused.
    #[error("the export download link was refused (HTTP {status}): expired or not valid")]
    LinkRefused {
        /// 401 or 403.
        status: u16,
    },
    /// Another non-2xx answer.
    #[error("the export download answered HTTP {status}")]
    Status {
        /// HTTP status.
        status: u16,
    },
    /// No answer, or a pause between chunks, longer than the client's timeout.
    #[error("timed out downloading the export")]
    Timeout,
    /// Connection-level failure.
    #[error("transport error downloading the export: {message}")]
    Transport {
        /// Cause chain, without the URL.
        message: String,
    },
    /// The file is not the expected CSV.
    #[error("the export file is not valid: {0}")]
    Csv(#[from] CsvError),
    /// The link is not an absolute http(s) URL.
    #[error("the export download link is not an http(s) URL")]
    InvalidUrl,
}

impl DownloadError {
    fn from_reqwest(error: reqwest::Error) -> Self {
        if error.is_timeout() {
            return DownloadError::Timeout;
        }
        let error = error.without_url();
        let mut message = error.to_string();
        let mut source = std::error::Error::source(&error);
        while let Some(cause) = source {
            message.push_str(": ");
            message.push_str(&cause.to_string());
            source = cause.source();
        }
        DownloadError::Transport { message }
    }

    /// Whether asking for a new link and downloading again may succeed (an expired link, a
    /// timeout, a transport failure, a 5xx).
    pub fn is_retryable(&self) -> bool {
        match self {
            DownloadError::LinkRefused { .. }
            | DownloadError::Timeout
            | DownloadError::Transport { .. } => true,
            DownloadError::Status { status } => *status >= 500 || *status == 429,
            DownloadError::Csv(_) | DownloadError::InvalidUrl => false,
        }
    }
}

/// One row of a customer export, read by column name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExportRow {
    columns: Arc<[String]>,
    values: Vec<String>,
}

/// The identifier columns, not attributes.
const ID_COLUMNS: [&str; 3] = ["id", "email", "cio_id"];

impl ExportRow {
    /// A row under these column names (a short row reads as empty fields).
    pub fn new(columns: Arc<[String]>, values: Vec<String>) -> Self {
        Self { columns, values }
    }

    /// The header row's names.
    pub fn columns(&self) -> &[String] {
        &self.columns
    }

    /// The field under `column`, as written (`Some("")` for an empty field); `None` when the
    /// file has no such column.
    pub fn get(&self, column: &str) -> Option<&str> {
        let index = self.columns.iter().position(|c| c == column)?;
        Some(self.values.get(index).map_or("", String::as_str))
    }

    fn non_empty(&self, column: &str) -> Option<&str> {
        self.get(column).filter(|v| !v.is_empty())
    }

    /// The person's `id`, if set.
    pub fn id(&self) -> Option<&str> {
        self.non_empty("id")
    }

    /// The person's email, if set.
    pub fn email(&self) -> Option<&str> {
        self.non_empty("email")
    }

    /// The person's `cio_id`.
    pub fn cio_id(&self) -> Option<&str> {
        self.non_empty("cio_id")
    }

    /// The attribute columns (every column but `id`, `email`, `cio_id`) with their fields;
    /// an empty field means the person does not have the attribute.
    pub fn attributes(&self) -> impl Iterator<Item = (&str, &str)> {
        self.columns
            .iter()
            .enumerate()
            .filter(|(_, c)| !ID_COLUMNS.contains(&c.as_str()))
            .map(|(i, c)| (c.as_str(), self.values.get(i).map_or("", String::as_str)))
    }
}

enum Download {
    Start(reqwest::RequestBuilder),
    Body(reqwest::Response),
    Done,
}

enum Rows<S> {
    Reading {
        chunks: S,
        reader: CsvReader,
        columns: Option<Arc<[String]>>,
    },
    Done,
}

fn rows_of(
    columns: &mut Option<Arc<[String]>>,
    records: Vec<Vec<String>>,
) -> Vec<Result<ExportRow, DownloadError>> {
    let mut rows = Vec::with_capacity(records.len());
    for record in records {
        match columns {
            None => *columns = Some(Arc::from(record)),
            Some(names) => rows.push(Ok(ExportRow::new(names.clone(), record))),
        }
    }
    rows
}

impl CioClient {
    /// `POST /v1/exports/customers`: starts an export of the people matching `filter` (an
    /// audience filter: `{"segment":{"id":N}}`, `{"and":[..]}`, ...) with `attributes` as extra
    /// columns. Never retried automatically: a timeout is an outcome-unknown error (a stray
    /// export is harmless; start another).
    pub async fn create_customer_export<S: AsRef<str>>(
        &self,
        filter: &Value,
        attributes: &[S],
    ) -> Result<Export, CioError> {
        let body = CreateExport {
            filters: filter,
            attributes: attributes.iter().map(AsRef::as_ref).collect(),
        };
        let answer: ExportResponse = self
            .request(&endpoints::CREATE_CUSTOMER_EXPORT, &[], &[], Some(&body))
            .await?;
        Ok(answer.export)
    }

    /// `GET /v1/exports/{export_id}`.
    pub async fn get_export(&self, id: i64) -> Result<Export, CioError> {
        let id = id.to_string();
        let answer: ExportResponse = self
            .request(&endpoints::GET_EXPORT, &[&id], &[], None::<&()>)
            .await?;
        Ok(answer.export)
    }

    /// `GET /v1/exports/{export_id}/download`: the signed link of a done export (valid 15
    /// minutes). A link that is not an absolute http(s) URL is a [`CioError::Decode`].
    pub async fn export_download_url(&self, id: i64) -> Result<Url, CioError> {
        let id = id.to_string();
        let answer: DownloadResponse = self
            .request(&endpoints::EXPORT_DOWNLOAD, &[&id], &[], None::<&()>)
            .await?;
        Url::parse(&answer.url)
            .ok()
            .filter(|u| matches!(u.scheme(), "http" | "https") && u.host().is_some())
            .ok_or_else(|| CioError::Decode {
                api: endpoints::EXPORT_DOWNLOAD.api,
                endpoint: endpoints::EXPORT_DOWNLOAD.template,
                message: "the download url is not an absolute http(s) URL".to_owned(),
            })
    }

    /// Downloads an export file from its signed link, as the chunks arrive. No credentials are
    /// sent. The first item is the error when the link is refused (403: expired, ask for a new
    /// one) or the request fails; an error ends the stream.
    pub fn download_export(
        &self,
        url: &Url,
    ) -> impl Stream<Item = Result<Bytes, DownloadError>> + Send + 'static {
        let start = if matches!(url.scheme(), "http" | "https") && url.host().is_some() {
            Ok(self.files_http().get(url.clone()))
        } else {
            Err(DownloadError::InvalidUrl)
        };
        let timeout = self.timeout();
        let first = match start {
            Ok(request) => Download::Start(request),
            Err(error) => {
                return stream::iter(vec![Err(error)]).left_stream();
            }
        };
        stream::unfold(first, move |state| async move {
            match state {
                Download::Start(request) => {
                    let response = match tokio::time::timeout(timeout, request.send()).await {
                        Err(_) => return Some((Err(DownloadError::Timeout), Download::Done)),
                        Ok(Err(e)) => {
                            return Some((Err(DownloadError::from_reqwest(e)), Download::Done));
                        }
                        Ok(Ok(response)) => response,
                    };
                    let status = response.status().as_u16();
                    if !(200..300).contains(&status) {
                        let error = match status {
                            401 | 403 => DownloadError::LinkRefused { status },
                            _ => DownloadError::Status { status },
                        };
                        return Some((Err(error), Download::Done));
                    }
                    next_chunk(response, timeout).await
                }
                Download::Body(response) => next_chunk(response, timeout).await,
                Download::Done => None,
            }
        })
        .right_stream()
    }

    /// [`download_export`](Self::download_export) parsed: one [`ExportRow`] per person, read
    /// by the header's column names, in bounded memory.
    pub fn export_rows(
        &self,
        url: &Url,
    ) -> impl Stream<Item = Result<ExportRow, DownloadError>> + Send + 'static {
        let chunks = Box::pin(self.download_export(url));
        stream::unfold(
            Rows::Reading {
                chunks,
                reader: CsvReader::new(),
                columns: None,
            },
            |state| async move {
                let Rows::Reading {
                    mut chunks,
                    mut reader,
                    mut columns,
                } = state
                else {
                    return None;
                };
                loop {
                    match chunks.next().await {
                        Some(Ok(chunk)) => match reader.push(&chunk) {
                            Ok(records) => {
                                let rows = rows_of(&mut columns, records);
                                if !rows.is_empty() {
                                    let state = Rows::Reading {
                                        chunks,
                                        reader,
                                        columns,
                                    };
                                    return Some((stream::iter(rows), state));
                                }
                            }
                            Err(e) => {
                                return Some((stream::iter(vec![Err(e.into())]), Rows::Done));
                            }
                        },
                        Some(Err(e)) => return Some((stream::iter(vec![Err(e)]), Rows::Done)),
                        None => {
                            let rows = match reader.finish() {
                                Ok(last) => rows_of(&mut columns, last.into_iter().collect()),
                                Err(e) => vec![Err(e.into())],
                            };
                            return Some((stream::iter(rows), Rows::Done));
                        }
                    }
                }
            },
        )
        .flatten()
    }
}

async fn next_chunk(
    mut response: reqwest::Response,
    timeout: Duration,
) -> Option<(Result<Bytes, DownloadError>, Download)> {
    match tokio::time::timeout(timeout, response.chunk()).await {
        Err(_) => Some((Err(DownloadError::Timeout), Download::Done)),
        Ok(Err(e)) => Some((Err(DownloadError::from_reqwest(e)), Download::Done)),
        Ok(Ok(Some(chunk))) => Some((Ok(chunk), Download::Body(response))),
        Ok(Ok(None)) => None,
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn export_flags_and_lenient_fields() {
        let pending: Export = serde_json::from_value(serde_json::json!({
            "id": "3", "type": "customers", "total": 0, "done": false, "failed": false
        }))
        .unwrap();
        assert!(!pending.is_done() && !pending.is_failed());
        let done: Export =
            serde_json::from_value(serde_json::json!({"id": 3, "status": "done", "total": 12}))
                .unwrap();
        assert!(done.is_done());
        assert_eq!(done.rows(), 12);
        let failed: Export =
            serde_json::from_value(serde_json::json!({"id": 3, "failed": true, "done": true}))
                .unwrap();
        assert!(failed.is_failed() && !failed.is_done());
    }

    #[test]
    fn rows_read_by_column_name() {
        let columns: Arc<[String]> = Arc::from(vec![
            "cio_id".to_owned(),
            "plan".to_owned(),
            "id".to_owned(),
            "email".to_owned(),
        ]);
        let row = ExportRow::new(columns, vec!["c1".into(), "pro".into(), "".into()]);
        assert_eq!(row.cio_id(), Some("c1"));
        assert_eq!(row.id(), None);
        assert_eq!(row.email(), None, "a short row reads as empty");
        assert_eq!(row.get("plan"), Some("pro"));
        assert_eq!(row.get("nope"), None);
        assert_eq!(row.attributes().collect::<Vec<_>>(), vec![("plan", "pro")]);
    }

    #[test]
    fn create_body_omits_empty_attributes() {
        let filter = serde_json::json!({"segment": {"id": 1}});
        let body = CreateExport {
            filters: &filter,
            attributes: vec![],
        };
        assert_eq!(
            serde_json::to_string(&body).unwrap(),
            r#"{"filters":{"segment":{"id":1}}}"#
        );
    }
}
