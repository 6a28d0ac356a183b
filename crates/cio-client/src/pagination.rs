//! Cursor pagination for every Customer.io endpoint that answers `next`.
//!
//! Customer.io's cursors are opaque strings passed back as `start=`; a missing or empty `next`,
//! or an empty page, ends the listing.

use std::future::Future;

use futures::Stream;
use futures::stream::{self, StreamExt as _};

use crate::error::CioError;

/// One page of a cursor listing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Page<T> {
    /// The items of this page.
    pub items: Vec<T>,
    /// Cursor of the next page (`None` or empty: this was the last one).
    pub next: Option<String>,
}

enum State<F> {
    More { cursor: Option<String>, fetch: F },
    Done,
}

/// Streams every item of a cursor listing. `fetch(cursor)` loads one page (`None` for the
/// first); pages are fetched lazily as the stream is polled. An error is yielded once and ends
/// the stream. The stream is not `Unpin`: use `futures::pin_mut!` or `Box::pin` to poll it.
///
/// ```no_run
/// use cio_client::{CioClient, Page, paginate};
/// use futures::TryStreamExt as _;
///
/// # async fn demo(client: CioClient) -> Result<(), cio_client::CioError> {
/// let members = paginate(move |start: Option<String>| {
///     let client = client.clone();
///     async move {
///         let page = client.segment_membership_page(7, start.as_deref(), 1000).await?;
///         Ok(Page { items: page.identifiers, next: page.next })
///     }
/// });
/// let all: Vec<_> = members.try_collect().await?;
/// # Ok(())
/// # }
/// ```
pub fn paginate<T, F, Fut>(fetch: F) -> impl Stream<Item = Result<T, CioError>>
where
    F: FnMut(Option<String>) -> Fut,
    Fut: Future<Output = Result<Page<T>, CioError>>,
{
    stream::unfold(
        State::More {
            cursor: None,
            fetch,
        },
        |state| async move {
            let State::More { cursor, mut fetch } = state else {
                return None;
            };
            match fetch(cursor).await {
                Ok(page) => {
                    let next = page.next.filter(|n| !n.is_empty());
                    let state = match next {
                        Some(cursor) if !page.items.is_empty() => State::More {
                            cursor: Some(cursor),
                            fetch,
                        },
                        _ => State::Done,
                    };
                    let items: Vec<Result<T, CioError>> = page.items.into_iter().map(Ok).collect();
                    Some((stream::iter(items), state))
                }
                Err(error) => Some((stream::iter(vec![Err(error)]), State::Done)),
            }
        },
    )
    .flatten()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::config::Api;
    use std::sync::{Arc, Mutex};

    type CursorLog = Arc<Mutex<Vec<Option<String>>>>;

    fn pages(
        data: Vec<(Vec<u32>, Option<&'static str>)>,
    ) -> (impl Stream<Item = Result<u32, CioError>>, CursorLog) {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let log = seen.clone();
        let mut data = data.into_iter();
        let s = paginate(move |cursor| {
            log.lock().unwrap().push(cursor);
            let page = data.next();
            async move {
                match page {
                    Some((items, next)) => Ok(Page {
                        items,
                        next: next.map(str::to_owned),
                    }),
                    None => Err(CioError::Server {
                        api: Api::App,
                        status: 500,
                    }),
                }
            }
        });
        (s, seen)
    }

    #[tokio::test]
    async fn follows_cursors_until_empty_next() {
        let (s, seen) = pages(vec![
            (vec![1, 2], Some("c1")),
            (vec![3], Some("c2")),
            (vec![4], Some("")),
        ]);
        let items: Vec<u32> = s.map(Result::unwrap).collect().await;
        assert_eq!(items, vec![1, 2, 3, 4]);
        assert_eq!(
            *seen.lock().unwrap(),
            vec![None, Some("c1".into()), Some("c2".into())]
        );
    }

    #[tokio::test]
    async fn stops_on_missing_next_or_empty_page() {
        let (s, _) = pages(vec![(vec![1], None)]);
        assert_eq!(s.collect::<Vec<_>>().await.len(), 1);
        let (s, seen) = pages(vec![(vec![], Some("loop"))]);
        assert!(s.collect::<Vec<_>>().await.is_empty());
        assert_eq!(seen.lock().unwrap().len(), 1);
    }

    #[tokio::test]
    async fn an_error_is_yielded_once_and_ends_the_stream() {
        let (s, _) = pages(vec![(vec![1], Some("c1"))]);
        let all: Vec<_> = s.collect().await;
        assert_eq!(all.len(), 2);
        assert!(all[0].is_ok());
        assert!(matches!(all[1], Err(CioError::Server { .. })));
    }
}
