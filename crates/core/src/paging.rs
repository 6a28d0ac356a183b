//! Keyset paging, written once: a listing fetches `limit + 1` rows after a position, keeps
//! `limit`, and hands back the position after the last one kept when more follow. Turning a
//! position into an opaque token is the protocol's business (the server's page tokens).

/// One page of a listing.
#[derive(Debug, Clone, PartialEq)]
pub struct Page<T, P> {
    pub items: Vec<T>,
    /// Where the next page starts; `None` on the last page.
    pub next: Option<P>,
}

impl<T, P> Page<T, P> {
    /// Cuts `rows` (fetched with `limit + 1`) to `limit`, taking the next position from the last
    /// row kept when there were more.
    pub fn cut(mut rows: Vec<T>, limit: u64, position: impl Fn(&T) -> P) -> Self {
        let limit = usize::try_from(limit).unwrap_or(usize::MAX);
        let next = if rows.len() > limit {
            rows.truncate(limit);
            rows.last().map(position)
        } else {
            None
        };
        Self { items: rows, next }
    }

    /// The rows to fetch for a page of `limit`.
    pub fn fetch(limit: u64) -> u64 {
        limit.saturating_add(1)
    }

    /// The same page with its items mapped.
    pub fn map<U>(self, f: impl FnMut(T) -> U) -> Page<U, P> {
        Page {
            items: self.items.into_iter().map(f).collect(),
            next: self.next,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_full_page_points_after_its_last_item_and_a_short_one_ends() {
        let page = Page::cut(vec![1, 2, 3, 4], 3, |n| n * 10);
        assert_eq!((page.items, page.next), (vec![1, 2, 3], Some(30)));
        let page = Page::cut(vec![1, 2, 3], 3, |n| n * 10);
        assert_eq!((page.items, page.next), (vec![1, 2, 3], None));
        let page = Page::cut(Vec::<i32>::new(), 3, |n| *n);
        assert!(page.items.is_empty() && page.next.is_none());
        assert_eq!(Page::<(), ()>::fetch(u64::MAX), u64::MAX);
    }
}
