//! The want-list: which of a batch's files the consumer needs, as a bitmap over the batch's file
//! indexes (the n-th file entry of the manifest is file n). PROTOCOL.md, "The want-list", has the
//! exchange; this is the value both sides hold and compare.
//!
//! A list covers files `0..covered`; files from `covered` on are always wanted, so a list cut short
//! (a reverse area smaller than the manifest) only costs data that did not need to cross, never
//! data that did. `covered == 0` is "everything".

/// FNV-1a 64 offset basis and prime (a checksum against mix-ups, not a defence: a peer that wants
/// to lie can; it only harms its own batch).
const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
const FNV_PRIME: u64 = 0x0000_0100_0000_01b3;

/// Which files of a batch the consumer wants.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct WantList {
    covered: u64,
    /// Bit `i % 64` of word `i / 64` set: file `i` is wanted. Bits at or past `covered` are zero.
    words: Vec<u64>,
}

impl WantList {
    /// Every file wanted (no list).
    pub fn all() -> Self {
        Self::default()
    }

    /// A list over files `0..covered` with none of them wanted yet ([`WantList::want`] adds them).
    pub fn none_of(covered: u64) -> Self {
        WantList { covered, words: vec![0; covered.div_ceil(64) as usize] }
    }

    /// A list from the words read back from a reverse area: bits at or past `covered` are cleared
    /// (they are not part of the list, whatever the memory held).
    pub fn from_words(covered: u64, mut words: Vec<u64>) -> Self {
        words.resize(covered.div_ceil(64) as usize, 0);
        if !covered.is_multiple_of(64)
            && let Some(last) = words.last_mut()
        {
            *last &= (1u64 << (covered % 64)) - 1;
        }
        WantList { covered, words }
    }

    /// Marks file `file` wanted (ignored past `covered`: those are wanted anyway).
    pub fn want(&mut self, file: u64) {
        if file < self.covered {
            self.words[(file / 64) as usize] |= 1 << (file % 64);
        }
    }

    /// Whether file `file` is wanted.
    pub fn is_wanted(&self, file: u64) -> bool {
        file >= self.covered || self.words[(file / 64) as usize] & (1 << (file % 64)) != 0
    }

    /// Files the list covers (0: none, every file is wanted).
    pub fn covered(&self) -> u64 {
        self.covered
    }

    /// The bitmap words (`covered.div_ceil(64)` of them).
    pub fn words(&self) -> &[u64] {
        &self.words
    }

    /// The same list cut to its first `max` files (the rest become wanted).
    pub fn truncated(&self, max: u64) -> WantList {
        if self.covered <= max { self.clone() } else { WantList::from_words(max, self.words.clone()) }
    }

    /// Files of `0..files` the list leaves out (not wanted).
    pub fn unwanted_of(&self, files: u64) -> u64 {
        (0..files.min(self.covered)).filter(|&f| !self.is_wanted(f)).count() as u64
    }

    /// What WANTED carries so the consumer can check the producer applied its list: FNV-1a 64
    /// over `covered` and the words, little-endian. 0 for "everything".
    pub fn digest(&self) -> u64 {
        if self.covered == 0 {
            return 0;
        }
        let mut h = FNV_OFFSET;
        let bytes = self.covered.to_le_bytes().into_iter().chain(self.words.iter().flat_map(|w| w.to_le_bytes()));
        for b in bytes {
            h ^= u64::from(b);
            h = h.wrapping_mul(FNV_PRIME);
        }
        h
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bits_past_covered_are_wanted_and_never_stored() {
        let mut l = WantList::none_of(70);
        l.want(3);
        l.want(69);
        l.want(500);
        assert!(l.is_wanted(3) && l.is_wanted(69) && l.is_wanted(70) && l.is_wanted(10_000));
        assert!(!l.is_wanted(0) && !l.is_wanted(68));
        assert_eq!(l.unwanted_of(100), 68);
        let back = WantList::from_words(70, vec![l.words()[0], l.words()[1] | !0 << 6]);
        assert_eq!(back, l, "bits past `covered` in shared memory are not part of the list");
        let cut = l.truncated(64);
        assert_eq!((cut.covered(), cut.is_wanted(3), cut.is_wanted(5), cut.is_wanted(65)), (64, true, false, true));
    }

    #[test]
    fn the_digest_tells_lists_apart() {
        let mut a = WantList::none_of(10);
        a.want(1);
        let mut b = WantList::none_of(10);
        b.want(2);
        let c = WantList::none_of(11);
        assert_ne!(a.digest(), b.digest());
        assert_ne!(WantList::none_of(10).digest(), c.digest(), "the same bits over another length differ");
        assert_eq!(WantList::all().digest(), 0);
        assert_eq!(a.digest(), a.clone().digest());
    }
}
