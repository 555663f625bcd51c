//! Prefix caching: KV-cache pages whose every position is computed are kept, keyed by the
//! tokens up to and including them, so a later request with the same prefix (a system prompt,
//! the earlier turns of a chat) starts from them instead of recomputing. A page is shared only
//! through a verified prefix: its key chains the hash of every token before it, and a lookup
//! checks the page's own tokens and its parent's key, not just a hash. The cache holds one
//! reference to each page it keeps; pages only the cache holds are evicted least recently used
//! first when the pool runs dry.

use std::collections::hash_map::Entry;
use std::collections::{BTreeSet, HashMap};
use std::hash::{Hash, Hasher};

use crate::kvcache::PagePool;

/// Key of the empty prefix (the parent of a sequence's first page).
const ROOT: u64 = 0x9e37_79b9_7f4a_7c15;

/// The chained key of a full page: its parent's key and its own tokens.
pub fn page_key(parent: u64, tokens: &[i64]) -> u64 {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    parent.hash(&mut h);
    tokens.hash(&mut h);
    h.finish()
}

struct Block {
    page: u32,
    parent: u64,
    tokens: Vec<i64>,
    last_use: u64,
}

#[derive(Default)]
pub struct PrefixCache {
    blocks: HashMap<u64, Block>,
    /// (last use, key) of every block, oldest first.
    lru: BTreeSet<(u64, u64)>,
    tick: u64,
    /// Prompt tokens looked up and found, over the cache's life.
    pub queried_tokens: usize,
    pub hit_tokens: usize,
}

impl PrefixCache {
    /// Pages kept by the cache.
    pub fn len(&self) -> usize {
        self.blocks.len()
    }

    pub fn is_empty(&self) -> bool {
        self.blocks.is_empty()
    }

    fn touch(&mut self, key: u64) {
        self.tick += 1;
        let tick = self.tick;
        if let Some(b) = self.blocks.get_mut(&key) {
            self.lru.remove(&(b.last_use, key));
            b.last_use = tick;
            self.lru.insert((tick, key));
        }
    }

    /// The longest cached prefix of `tokens` in whole pages, leaving at least one token to
    /// compute: its pages (each now also held by the caller) and their keys.
    pub fn lookup(&mut self, pool: &mut PagePool, tokens: &[i64], page: usize) -> (Vec<u32>, Vec<u64>) {
        let (mut pages, mut keys) = (Vec::new(), Vec::new());
        let mut parent = ROOT;
        let full = tokens.len().saturating_sub(1) / page;
        for j in 0..full {
            let chunk = &tokens[j * page..(j + 1) * page];
            let key = page_key(parent, chunk);
            match self.blocks.get(&key) {
                Some(b) if b.parent == parent && b.tokens == chunk => {
                    pool.retain(b.page);
                    pages.push(b.page);
                    keys.push(key);
                    self.touch(key);
                    parent = key;
                }
                _ => break,
            }
        }
        self.queried_tokens += tokens.len();
        self.hit_tokens += pages.len() * page;
        (pages, keys)
    }

    /// Keeps the full pages of a sequence past those already kept (`keys` holds their keys and
    /// grows with the new ones): `tokens[..cached]` are computed into `pages`.
    pub fn register(
        &mut self,
        pool: &mut PagePool,
        tokens: &[i64],
        cached: usize,
        pages: &[u32],
        keys: &mut Vec<u64>,
        page: usize,
    ) {
        while (keys.len() + 1) * page <= cached && keys.len() < pages.len() {
            let j = keys.len();
            let parent = keys.last().copied().unwrap_or(ROOT);
            let chunk = &tokens[j * page..(j + 1) * page];
            let key = page_key(parent, chunk);
            match self.blocks.entry(key) {
                Entry::Vacant(v) => {
                    pool.retain(pages[j]);
                    v.insert(Block { page: pages[j], parent, tokens: chunk.to_vec(), last_use: 0 });
                    self.lru.insert((0, key));
                }
                // Another sequence's page with the same prefix: this one's stays its own.
                Entry::Occupied(o) if o.get().parent == parent && o.get().tokens == chunk => {}
                // A hash collision with another prefix: keep nothing more of this sequence, so
                // no later page is ever keyed through a block whose content differs.
                Entry::Occupied(_) => return,
            }
            self.touch(key);
            keys.push(key);
        }
    }

    /// Pages only the cache holds (what `evict_one` could free).
    pub fn evictable(&self, pool: &PagePool) -> usize {
        self.blocks.values().filter(|b| pool.refs(b.page) == 1).count()
    }

    /// Frees the least recently used page that only the cache holds; false when there is none.
    pub fn evict_one(&mut self, pool: &mut PagePool) -> bool {
        let victim = self.lru.iter().find(|&&(_, key)| pool.refs(self.blocks[&key].page) == 1).copied();
        let Some((tick, key)) = victim else { return false };
        self.lru.remove(&(tick, key));
        let b = self.blocks.remove(&key).expect("in the LRU, so in the map");
        pool.release([b.page]);
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shares_verified_prefixes_and_evicts_only_unshared_pages() {
        let mut pool = PagePool::new(8);
        let mut cache = PrefixCache::default();
        let a: Vec<i64> = (0..10).collect();
        // Sequence a computed 10 tokens into 3 pages of 4: two are full and kept.
        let pages: Vec<u32> = (0..3).map(|_| pool.alloc().unwrap()).collect();
        let mut keys = Vec::new();
        cache.register(&mut pool, &a, 10, &pages, &mut keys, 4);
        assert_eq!((keys.len(), cache.len()), (2, 2));
        // b shares the first 6 tokens: one page; c all 10 and more: two; d none.
        let b: Vec<i64> = (0..6).chain([99, 98]).collect();
        assert_eq!(cache.lookup(&mut pool, &b, 4).0, vec![pages[0]]);
        let c: Vec<i64> = (0..12).collect();
        assert_eq!(cache.lookup(&mut pool, &c, 4).0, pages[..2].to_vec());
        assert!(cache.lookup(&mut pool, &[5, 1, 2, 3, 4], 4).0.is_empty());
        // A prompt of exactly 8 tokens reuses one page: its last token must be computed.
        assert_eq!(cache.lookup(&mut pool, &a[..8], 4).0.len(), 1);
        assert_eq!(pool.refs(pages[0]), 5, "held by a, the cache, b, c and the 8-token prompt");
        // Everyone but the cache lets go: the pages stay cached, evictable oldest first.
        pool.release([pages[0], pages[0], pages[0], pages[0], pages[1], pages[1], pages[2]]);
        assert_eq!(pool.refs(pages[0]), 1);
        assert_eq!(pool.available(), 6);
        assert!(cache.evict_one(&mut pool) && cache.evict_one(&mut pool));
        assert!(!cache.evict_one(&mut pool));
        assert_eq!(pool.available(), 8);
    }
}
