//! The payload of a `Pages` frame: a batch of page items, encoded in place and read without copying.

use std::fmt;

use perfplus_common::PAGE_SIZE;

use super::header::{
    FrameError, FrameType, DIGEST_LEN, FULL_ITEM_LEN, PAGE_BATCH_MAX_ITEMS, REF_ITEM_LEN, ZERO_ITEM_LEN,
};

const KIND_ZERO: u8 = 0;
const KIND_FULL: u8 = 1;
const KIND_REF: u8 = 2;

/// A batch of page items, encoded in place: the payload of a `Pages` frame.
///
/// Items, back to back, integers little-endian:
/// ```text
/// Zero: u8 0, u64 page                                   (9 bytes)
/// Full: u8 1, u64 page, [u8; 16] digest, [u8; 4096] data (4121 bytes)
/// Ref:  u8 2, u64 page, [u8; 16] digest                  (25 bytes)
/// ```
/// Build with the `push_*` methods (at most [`PAGE_BATCH_MAX_ITEMS`] items: check [`is_full`](Self::is_full)),
/// read with [`iter`](Self::iter). A batch decoded from a frame was validated whole by
/// [`from_payload`](Self::from_payload), so its iterator yields no errors; the iterator still checks
/// every item as it goes.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct PageBatch {
    bytes: Vec<u8>,
    items: usize,
}

/// One item of a [`PageBatch`], borrowed from the batch's bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PageItem<'a> {
    /// The page's content, with its digest.
    Full {
        page: u64,
        digest: &'a [u8; DIGEST_LEN],
        data: &'a [u8; PAGE_SIZE],
    },
    /// The page is all zeroes.
    Zero { page: u64 },
    /// The page holds the content with this digest, which the destination already has.
    Ref { page: u64, digest: &'a [u8; DIGEST_LEN] },
}

impl PageItem<'_> {
    /// The guest page the item is about.
    pub fn page(&self) -> u64 {
        match *self {
            PageItem::Full { page, .. } | PageItem::Zero { page } | PageItem::Ref { page, .. } => page,
        }
    }
}

impl fmt::Debug for PageBatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PageBatch")
            .field("items", &self.items)
            .field("payload_len", &self.bytes.len())
            .finish()
    }
}

impl PageBatch {
    /// An empty batch.
    pub fn new() -> PageBatch {
        PageBatch::default()
    }

    /// An empty batch with room for `pages` full items (capped at [`PAGE_BATCH_MAX_ITEMS`]).
    pub fn with_capacity(pages: usize) -> PageBatch {
        PageBatch {
            bytes: Vec::with_capacity(pages.min(PAGE_BATCH_MAX_ITEMS) * FULL_ITEM_LEN),
            items: 0,
        }
    }

    /// Appends a page sent in full.
    pub fn push_full(&mut self, page: u64, digest: &[u8; DIGEST_LEN], data: &[u8; PAGE_SIZE]) {
        self.bytes.reserve(FULL_ITEM_LEN);
        self.bytes.push(KIND_FULL);
        self.bytes.extend_from_slice(&page.to_le_bytes());
        self.bytes.extend_from_slice(digest);
        self.bytes.extend_from_slice(data);
        self.items += 1;
    }

    /// Appends a zero-page marker.
    pub fn push_zero(&mut self, page: u64) {
        self.bytes.push(KIND_ZERO);
        self.bytes.extend_from_slice(&page.to_le_bytes());
        self.items += 1;
    }

    /// Appends a reference to content the destination holds.
    pub fn push_ref(&mut self, page: u64, digest: &[u8; DIGEST_LEN]) {
        self.bytes.push(KIND_REF);
        self.bytes.extend_from_slice(&page.to_le_bytes());
        self.bytes.extend_from_slice(digest);
        self.items += 1;
    }

    /// Appends `item` (read from another batch) as it was.
    pub fn push_item(&mut self, item: &PageItem<'_>) {
        match *item {
            PageItem::Full { page, digest, data } => self.push_full(page, digest, data),
            PageItem::Zero { page } => self.push_zero(page),
            PageItem::Ref { page, digest } => self.push_ref(page, digest),
        }
    }

    /// Items in the batch.
    pub fn len(&self) -> usize {
        self.items
    }

    /// True when the batch holds no item.
    pub fn is_empty(&self) -> bool {
        self.items == 0
    }

    /// True when the batch holds [`PAGE_BATCH_MAX_ITEMS`] items: send it before pushing more.
    pub fn is_full(&self) -> bool {
        self.items >= PAGE_BATCH_MAX_ITEMS
    }

    /// Bytes of the encoded items (the `Pages` frame's payload).
    pub fn payload_len(&self) -> usize {
        self.bytes.len()
    }

    /// The encoded items.
    pub fn as_bytes(&self) -> &[u8] {
        &self.bytes
    }

    /// Removes every item, keeping the allocation.
    pub fn clear(&mut self) {
        self.bytes.clear();
        self.items = 0;
    }

    /// Iterates over the items, borrowing their digests and contents from the batch.
    /// Yields an error (and then stops) at an item of unknown kind or a truncated item.
    pub fn iter(&self) -> PageItems<'_> {
        PageItems {
            rest: &self.bytes,
            index: 0,
            done: false,
        }
    }

    /// Takes ownership of a `Pages` payload after checking every item's kind and length and the item
    /// count; nothing is copied.
    pub fn from_payload(bytes: Vec<u8>) -> Result<PageBatch, FrameError> {
        FrameType::Pages.check_len(bytes.len())?;
        let mut items = 0;
        let mut rest = &bytes[..];
        while !rest.is_empty() {
            if items == PAGE_BATCH_MAX_ITEMS {
                return Err(FrameError::TooManyItems {
                    count: items + 1,
                    max: PAGE_BATCH_MAX_ITEMS,
                });
            }
            let (_, len) = parse_item(rest, items)?;
            rest = &rest[len..];
            items += 1;
        }
        Ok(PageBatch { bytes, items })
    }

    /// The checks a decoder would make, for the encoder: item count and payload size.
    pub(super) fn check(&self) -> Result<(), FrameError> {
        if self.items > PAGE_BATCH_MAX_ITEMS {
            return Err(FrameError::TooManyItems {
                count: self.items,
                max: PAGE_BATCH_MAX_ITEMS,
            });
        }
        FrameType::Pages.check_len(self.bytes.len())
    }
}

impl<'a> IntoIterator for &'a PageBatch {
    type Item = Result<PageItem<'a>, FrameError>;
    type IntoIter = PageItems<'a>;
    fn into_iter(self) -> PageItems<'a> {
        self.iter()
    }
}

/// Iterator over the items of a [`PageBatch`].
pub struct PageItems<'a> {
    rest: &'a [u8],
    index: usize,
    done: bool,
}

impl<'a> Iterator for PageItems<'a> {
    type Item = Result<PageItem<'a>, FrameError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.done || self.rest.is_empty() {
            return None;
        }
        match parse_item(self.rest, self.index) {
            Ok((item, len)) => {
                self.rest = &self.rest[len..];
                self.index += 1;
                Some(Ok(item))
            }
            Err(e) => {
                self.done = true;
                Some(Err(e))
            }
        }
    }
}

/// Parses the item at the start of `buf` (item number `index`, for errors): the item and its length.
fn parse_item(buf: &[u8], index: usize) -> Result<(PageItem<'_>, usize), FrameError> {
    let kind = buf[0];
    let (name, len) = match kind {
        KIND_ZERO => ("zero", ZERO_ITEM_LEN),
        KIND_FULL => ("full", FULL_ITEM_LEN),
        KIND_REF => ("reference", REF_ITEM_LEN),
        other => {
            return Err(FrameError::PageItem {
                index,
                detail: format!("unknown kind {other}"),
            })
        }
    };
    let Some(item) = buf.get(..len) else {
        return Err(FrameError::PageItem {
            index,
            detail: format!("truncated: a {name} item is {len} bytes, only {} remain", buf.len()),
        });
    };
    let page = u64::from_le_bytes(item[1..9].try_into().expect("8-byte slice"));
    let item = match kind {
        KIND_ZERO => PageItem::Zero { page },
        KIND_FULL => PageItem::Full {
            page,
            digest: item[9..25].try_into().expect("16-byte slice"),
            data: item[25..].try_into().expect("4096-byte slice"),
        },
        _ => PageItem::Ref {
            page,
            digest: item[9..25].try_into().expect("16-byte slice"),
        },
    };
    Ok((item, len))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::frame::header::PAGE_BATCH_MAX_PAYLOAD;
    use crate::frame::test_support::*;
    use crate::frame::{decode, encode, pages_header};
    use crate::Message;

    #[test]
    fn page_batch_round_trip() {
        let b = batch();
        assert_eq!(b.len(), 4);
        assert!(!b.is_empty());
        assert!(!b.is_full());
        assert_eq!(b.payload_len(), 2 * FULL_ITEM_LEN + ZERO_ITEM_LEN + REF_ITEM_LEN);
        assert_eq!(format!("{b:?}"), "PageBatch { items: 4, payload_len: 8276 }");

        let bytes = encoded(&Message::Pages(b.clone()));
        let Some((Message::Pages(decoded), _)) = decode(&bytes).unwrap() else {
            panic!("not a Pages message");
        };
        let items: Vec<_> = decoded.iter().collect::<Result<_, _>>().unwrap();
        let (p11, p22) = (page(0x11), page(0x22));
        assert_eq!(
            items,
            vec![
                PageItem::Full {
                    page: 7,
                    digest: &[1; 16],
                    data: &p11
                },
                PageItem::Zero { page: 8 },
                PageItem::Ref {
                    page: 9,
                    digest: &[2; 16]
                },
                PageItem::Full {
                    page: u64::MAX,
                    digest: &[3; 16],
                    data: &p22
                },
            ]
        );
        assert_eq!(
            items.iter().map(PageItem::page).collect::<Vec<_>>(),
            [7, 8, 9, u64::MAX]
        );
        // Zero-copy: the data reference points into the batch's own bytes.
        if let PageItem::Full { data, .. } = items[0] {
            let range = decoded.as_bytes().as_ptr_range();
            assert!(range.contains(&data.as_ptr()));
        }
        assert_eq!(decoded, b);
        // Items copied one by one make the same batch.
        let mut copied = PageBatch::new();
        for item in &decoded {
            copied.push_item(&item.unwrap());
        }
        assert_eq!(copied, b);

        let mut cleared = decoded.clone();
        cleared.clear();
        assert!(cleared.is_empty());
        assert_eq!(cleared.payload_len(), 0);
        assert_eq!(cleared.iter().count(), 0);
    }

    #[test]
    fn full_page_batch_fits_its_frame() {
        let mut b = PageBatch::with_capacity(PAGE_BATCH_MAX_ITEMS);
        for i in 0..PAGE_BATCH_MAX_ITEMS as u64 {
            b.push_full(i, &[i as u8; 16], &page(i as u8));
        }
        assert!(b.is_full());
        assert_eq!(b.payload_len(), PAGE_BATCH_MAX_PAYLOAD);
        let bytes = encoded(&Message::Pages(b.clone()));
        let (msg, _) = decode(&bytes).unwrap().unwrap();
        assert_eq!(msg, Message::Pages(b.clone()));

        // One more item is refused by the encoder, with `out` left as it was.
        b.push_zero(0);
        let mut out = vec![1, 2, 3];
        assert_eq!(
            encode(&Message::Pages(b.clone()), &mut out).unwrap_err().to_string(),
            "page batch of 1025 items exceeds the limit of 1024 items"
        );
        assert_eq!(out, [1, 2, 3]);
        assert!(pages_header(&b).is_err());
    }

    #[test]
    fn page_item_errors_name_the_item() {
        let mut raw = batch().as_bytes().to_vec();
        // Item 1 (the zero item) starts right after the first full item.
        raw[FULL_ITEM_LEN] = 7;
        assert_eq!(
            decode_err(&frame_bytes(FrameType::Pages, &raw)),
            "page item 1: unknown kind 7"
        );

        let whole = batch();
        let raw = &whole.as_bytes()[..FULL_ITEM_LEN + ZERO_ITEM_LEN + 10];
        assert_eq!(
            decode_err(&frame_bytes(FrameType::Pages, raw)),
            "page item 2: truncated: a reference item is 25 bytes, only 10 remain"
        );
        assert_eq!(
            decode_err(&frame_bytes(FrameType::Pages, &[KIND_FULL, 0, 0])),
            "page item 0: truncated: a full item is 4121 bytes, only 3 remain"
        );

        // More than PAGE_BATCH_MAX_ITEMS small items fit the byte limit but not the item limit.
        let mut many = PageBatch::new();
        for i in 0..=PAGE_BATCH_MAX_ITEMS as u64 {
            many.push_zero(i);
        }
        assert_eq!(
            decode_err(&frame_bytes(FrameType::Pages, many.as_bytes())),
            "page batch of 1025 items exceeds the limit of 1024 items"
        );
    }
}
