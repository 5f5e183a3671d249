//! Text-like page content, as the built-in guest writes it: words of English prose.
//!
//! Real memory that is not random (program text, strings, logs, page cache) compresses about 2-3x with
//! zstd because its bytes repeat at word scale. A page here is a run of common English words, drawn with
//! a Zipf-like skew (short, frequent words much more often than rare ones), separated by spaces, with
//! now and then a comma, a full stop and a capital, and a line break where a line passes 72 columns.
//! Measured on this generator with zstd level 1 (`perfplus-protocol`'s test
//! `text_pages_compress_like_real_text`): a page alone 2.1x, 64 pages compressed together 2.4x
//! (the letters-only text of earlier versions: 1.8-1.9x).
//!
//! A page is a pure function of its key (a splitmix64 stream), so the guest can regenerate what a page
//! must hold and check it, and tests can write the same pages the guest does.

use crate::splitmix::next;
use crate::PAGE_SIZE;

/// The words, most frequent first (a list of the most common English words).
#[rustfmt::skip]
const WORDS: &[&[u8]] = &[
    b"the", b"of", b"and", b"to", b"a", b"in", b"is", b"it", b"you", b"that", b"he", b"was", b"for",
    b"on", b"are", b"with", b"as", b"his", b"they", b"be", b"at", b"one", b"have", b"this", b"from",
    b"or", b"had", b"by", b"hot", b"word", b"but", b"what", b"some", b"we", b"can", b"out",
    b"other", b"were", b"all", b"there", b"when", b"up", b"use", b"your", b"how", b"said", b"an",
    b"each", b"she", b"which", b"do", b"their", b"time", b"if", b"will", b"way", b"about", b"many",
    b"then", b"them", b"write", b"would", b"like", b"so", b"these", b"her", b"long", b"make",
    b"thing", b"see", b"him", b"two", b"has", b"look", b"more", b"day", b"could", b"go", b"come",
    b"did", b"number", b"sound", b"no", b"most", b"people", b"my", b"over", b"know", b"water",
    b"than", b"call", b"first", b"who", b"may", b"down", b"side", b"been", b"now", b"find", b"any",
    b"new", b"work", b"part", b"take", b"get", b"place", b"made", b"live", b"where", b"after",
    b"back", b"little", b"only", b"round", b"man", b"year", b"came", b"show", b"every", b"good",
    b"me", b"give", b"our", b"under", b"name", b"very", b"through", b"just", b"form", b"sentence",
    b"great", b"think", b"say", b"help", b"low", b"line", b"differ", b"turn", b"cause", b"much",
    b"mean", b"before", b"move", b"right", b"boy", b"old", b"too", b"same", b"tell", b"does",
    b"set", b"three", b"want", b"air", b"well", b"also", b"play", b"small", b"end", b"put", b"home",
    b"read", b"hand", b"port", b"large", b"spell", b"add", b"even", b"land", b"here", b"must",
    b"big", b"high", b"such", b"follow", b"act", b"why", b"ask", b"men", b"change", b"went",
    b"light", b"kind", b"off", b"need", b"house", b"picture", b"try", b"us", b"again", b"animal",
    b"point", b"mother", b"world", b"near", b"build", b"self", b"earth", b"father", b"head",
    b"stand", b"own", b"page", b"should", b"country", b"found", b"answer", b"school", b"grow",
    b"study", b"still", b"learn", b"plant", b"cover", b"food", b"sun", b"four", b"between",
    b"state", b"keep", b"eye", b"never", b"last", b"let", b"thought", b"city", b"tree", b"cross",
    b"farm", b"hard", b"start", b"might", b"story", b"saw", b"far", b"sea", b"draw", b"left",
    b"late", b"run", b"while", b"press", b"close", b"night", b"real", b"life", b"few", b"north",
    b"open", b"seem", b"together", b"next", b"white", b"children", b"begin", b"got", b"walk",
    b"example", b"ease", b"paper", b"group", b"always", b"music", b"those", b"both", b"mark",
    b"often", b"letter", b"until", b"mile", b"river", b"car", b"feet", b"care", b"second", b"book",
    b"carry", b"took", b"science", b"eat", b"room", b"friend", b"began", b"idea", b"fish",
    b"mountain", b"stop", b"once", b"base", b"hear", b"horse", b"cut", b"sure", b"watch", b"color",
    b"face", b"wood", b"main", b"enough", b"plain", b"girl", b"usual", b"young", b"ready", b"above",
    b"ever", b"red", b"list", b"though", b"feel", b"talk", b"bird", b"soon", b"body", b"dog",
    b"family", b"direct", b"pose", b"leave", b"song", b"measure", b"door", b"product", b"black",
    b"short", b"numeral", b"class", b"wind", b"question", b"happen", b"complete", b"ship", b"area",
    b"half", b"rock", b"order", b"fire", b"south", b"problem", b"piece", b"told", b"knew", b"pass",
    b"since", b"top", b"whole", b"king", b"space", b"heard", b"best", b"hour", b"better", b"true",
    b"during", b"hundred", b"five", b"remember", b"step", b"early", b"hold", b"west", b"ground",
    b"interest", b"reach", b"fast",
];

/// Where a line is broken (at the next word boundary).
const LINE: usize = 72;

/// A word packed for a store of eight bytes: its letters little-endian, and its length.
const fn pack(word: &[u8]) -> (u64, usize) {
    let mut bits = 0u64;
    let mut i = 0;
    while i < word.len() {
        bits |= (word[i] as u64) << (8 * i);
        i += 1;
    }
    (bits, word.len())
}

/// [`WORDS`], packed (every word fits in eight bytes: a test checks).
const PACKED: [(u64, usize); WORDS.len()] = {
    let mut packed = [(0u64, 0usize); WORDS.len()];
    let mut i = 0;
    while i < WORDS.len() {
        packed[i] = pack(WORDS[i]);
        i += 1;
    }
    packed
};

/// What a word written whole may run past the page's end: eight bytes of word, two of separator.
const SLACK: usize = 16;

/// Writes the text page of `key` into `page`.
pub fn text_page(key: u64, page: &mut [u8; PAGE_SIZE]) {
    // Words and separators are stored eight and two bytes at a time (a copy of each word's own length
    // took 19 µs a page on this machine, this 7 µs); the last ones may run into the slack.
    let mut buf = [0u8; PAGE_SIZE + SLACK];
    let mut z = key;
    let (mut at, mut column, mut capital) = (0usize, 0usize, true);
    while at < PAGE_SIZE {
        let r = next(&mut z);
        // Zipf-like: the product of two uniform fractions has density -ln(x) on [0, 1), so the
        // first words of the list come up far more often than the last ones.
        let skew = ((r & 0xffff) * ((r >> 16) & 0xffff)) >> 16;
        let (mut bits, len) = PACKED[(skew as usize * WORDS.len()) >> 16];
        if capital {
            bits ^= 0x20; // the first letter in upper case
        }
        buf[at..at + 8].copy_from_slice(&bits.to_le_bytes());
        at += len;
        column += len;
        capital = false;
        let punctuation = (r >> 32) & 31;
        let mut separator: (&[u8; 2], usize) = (b"  ", 1);
        if punctuation == 0 {
            separator = (b". ", 2);
            capital = true;
        } else if punctuation < 3 {
            separator = (b", ", 2);
        }
        if column + 1 >= LINE {
            separator = if capital { (b".\n", 2) } else { (b"\n ", 1) };
            column = 0;
        } else {
            column += separator.1;
        }
        buf[at..at + 2].copy_from_slice(separator.0);
        at += separator.1;
    }
    page.copy_from_slice(&buf[..PAGE_SIZE]);
}

#[cfg(test)]
mod tests {
    extern crate std;
    use super::*;
    use std::vec::Vec;

    #[test]
    fn every_word_fits_in_eight_bytes() {
        let longest = WORDS.iter().map(|w| w.len()).max().unwrap();
        assert!(longest <= 8 && 8 + 2 <= SLACK, "{longest}");
        assert!(WORDS.iter().all(|w| w.iter().all(u8::is_ascii_lowercase)));
    }

    #[test]
    fn a_text_page_is_a_function_of_its_key() {
        let (mut a, mut b, mut c) = ([0u8; PAGE_SIZE], [1u8; PAGE_SIZE], [0u8; PAGE_SIZE]);
        text_page(7, &mut a);
        text_page(7, &mut b);
        text_page(8, &mut c);
        assert_eq!(a, b);
        assert_ne!(a, c);
    }

    #[test]
    fn a_text_page_is_words_and_separators() {
        let mut page = [0u8; PAGE_SIZE];
        text_page(42, &mut page);
        assert!(page.iter().all(|&b| b.is_ascii_alphabetic() || b" ,.\n".contains(&b)));
        // Every line ends before 72 columns plus one word.
        let longest = page.split(|&b| b == b'\n').map(<[u8]>::len).max().unwrap();
        assert!(longest < LINE + 10, "{longest}");
        // Words come from the list.
        let text = core::str::from_utf8(&page).unwrap();
        let inner: Vec<&str> = text.split([' ', ',', '.', '\n']).filter(|w| !w.is_empty()).collect();
        for w in &inner[1..inner.len() - 1] {
            let lower = w.to_ascii_lowercase();
            assert!(WORDS.contains(&lower.as_bytes()), "{w}");
        }
    }
}
