"""The KV page pool: allocation, reference counts, per-request page tables, prefix caching.

Only host integers live here; the pool's contents are device arrays owned by
the runner. A page is in one of three states:
  in use:   ref_count > 0, listed in the page table of at least one request;
  cached:   ref_count == 0 but keyed by a content hash, so a later request with
            the same prefix can take it back without recomputing it;
  free:     ref_count == 0 and holding nothing reusable.
Cached and free pages both sit in `_evictable`, oldest first; allocation takes
from the front, so the least recently used cached page is evicted last of all.
"""

import collections
import hashlib

import numpy as np

from jserve.engine.request import Request

_ROOT_KEY = b"jserve-prefix-root"


def page_key(parent_key: bytes, tokens) -> bytes:
  """Content key of a full page: its tokens chained with its parent's key."""
  data = np.asarray(tokens, dtype=np.int32).tobytes()
  return hashlib.blake2b(parent_key + data, digest_size=16).digest()


class KVCacheManager:
  """Owns the page pool of one engine. Page 0 is reserved as the target of padding reads."""

  def __init__(self, num_pages: int, page_size: int, enable_prefix_caching: bool = True):
    if num_pages < 2:
      raise ValueError(f"num_pages={num_pages}: need at least 2 (page 0 is reserved)")
    self.num_pages = num_pages
    self.page_size = page_size
    self.enable_prefix_caching = enable_prefix_caching
    self.ref_count = np.zeros(num_pages, dtype=np.int32)
    self.ref_count[0] = 1  # reserved forever
    self._evictable: collections.OrderedDict[int, None] = collections.OrderedDict(
        (p, None) for p in range(1, num_pages))
    self._key_of_page: dict[int, bytes] = {}
    self._page_of_key: dict[bytes, int] = {}
    self.page_tables: dict[str, list[int]] = {}
    self._num_hashed: dict[str, int] = {}  # full pages of a request already keyed
    self._last_key: dict[str, bytes] = {}
    self.query_tokens = 0
    self.hit_tokens = 0

  # --- counters -------------------------------------------------------------------------------
  @property
  def num_usable_pages(self) -> int:
    return self.num_pages - 1

  @property
  def num_free_pages(self) -> int:
    """Pages an allocation can take now (free or cached)."""
    return len(self._evictable)

  @property
  def num_used_pages(self) -> int:
    return self.num_usable_pages - len(self._evictable)

  @property
  def num_cached_pages(self) -> int:
    return sum(1 for p in self._evictable if p in self._key_of_page)

  @property
  def hit_rate(self) -> float:
    return self.hit_tokens / self.query_tokens if self.query_tokens else 0.0

  def pages_for(self, num_tokens: int) -> int:
    return -(-num_tokens // self.page_size)

  # --- prefix cache ---------------------------------------------------------------------------
  def find_cached_prefix(self, req: Request) -> list[int]:
    """Pages holding the longest cached prefix of the request's tokens.

    The last token is never taken from the cache: the step must compute it to
    get the logits of the next token.
    """
    if not self.enable_prefix_caching:
      return []
    max_pages = (req.num_tokens - 1) // self.page_size
    pages, key = [], _ROOT_KEY
    for i in range(max_pages):
      key = page_key(key, req.all_token_ids[i * self.page_size:(i + 1) * self.page_size])
      page = self._page_of_key.get(key)
      if page is None:
        break
      pages.append(page)
    return pages

  def _take(self, page: int):
    if self.ref_count[page] == 0:
      del self._evictable[page]
    self.ref_count[page] += 1

  def _pop_free(self) -> int:
    page, _ = self._evictable.popitem(last=False)
    key = self._key_of_page.pop(page, None)
    if key is not None:
      del self._page_of_key[key]
    self.ref_count[page] = 1
    return page

  # --- allocation -----------------------------------------------------------------------------
  def allocate(self, req: Request, num_new_tokens: int, cached_pages: list[int] = ()) -> bool:
    """Ensures `req` has pages for `num_computed_tokens + num_new_tokens` tokens.

    `cached_pages` (from `find_cached_prefix`, for a request with no pages yet)
    are taken first. Returns False and changes nothing if the pool is short.
    """
    table = self.page_tables.get(req.request_id)
    if table is not None and (req.num_computed_tokens + num_new_tokens - 1) // self.page_size < len(table):
      return True  # the common decode step: the last page has room
    if table is None:
      reusable = sum(1 for p in cached_pages if self.ref_count[p] == 0)
      need = self.pages_for(req.num_computed_tokens + num_new_tokens) - len(cached_pages)
      if need + reusable > self.num_free_pages:
        return False
      table = []
      for p in cached_pages:
        self._take(p)
        table.append(p)
      self.page_tables[req.request_id] = table
      self._num_hashed[req.request_id] = len(cached_pages)
      self._last_key[req.request_id] = self._key_of_page[cached_pages[-1]] if cached_pages else _ROOT_KEY
    else:
      need = self.pages_for(req.num_computed_tokens + num_new_tokens) - len(table)
      if need > self.num_free_pages:
        return False
    for _ in range(max(need, 0)):
      table.append(self._pop_free())
    return True

  def record_prefix_query(self, num_prompt_tokens: int, num_hit_tokens: int):
    self.query_tokens += num_prompt_tokens
    self.hit_tokens += num_hit_tokens

  def cache_full_pages(self, req: Request):
    """Keys the request's pages that became full with computed tokens, so others can share them."""
    rid = req.request_id
    done = self._num_hashed.get(rid)
    # Called for every request after every step: return at once unless a page may have filled.
    if not self.enable_prefix_caching or done is None or req.num_computed_tokens // self.page_size <= done:
      return
    table = self.page_tables[rid]
    # A page is keyed once its tokens are computed and known (not placeholders of a running step).
    num_full = min(min(req.num_computed_tokens, req.num_known_tokens) // self.page_size, len(table))
    key = self._last_key[rid]
    for i in range(self._num_hashed[rid], num_full):
      key = page_key(key, req.all_token_ids[i * self.page_size:(i + 1) * self.page_size])
      page = table[i]
      if key not in self._page_of_key and page not in self._key_of_page:
        self._page_of_key[key] = page
        self._key_of_page[page] = key
    self._num_hashed[rid] = max(self._num_hashed[rid], num_full)
    self._last_key[rid] = key

  def free(self, req: Request):
    """Releases the request's pages at once. Keyed pages stay cached; the rest become free.

    Pages are released tail first, so a prefix's later pages are evicted before
    its earlier ones (which more requests share).
    """
    table = self.page_tables.pop(req.request_id, None)
    self._num_hashed.pop(req.request_id, None)
    self._last_key.pop(req.request_id, None)
    if table is None:
      return
    for page in reversed(table):
      self.ref_count[page] -= 1
      if self.ref_count[page] == 0:
        self._evictable[page] = None
        if page not in self._key_of_page:
          self._evictable.move_to_end(page, last=False)  # holds nothing: reuse first

  def check_invariants(self):
    """Asserts the pool's bookkeeping is consistent (tests call this after every operation)."""
    counts = np.zeros(self.num_pages, dtype=np.int64)
    counts[0] = 1
    for table in self.page_tables.values():
      for p in table:
        counts[p] += 1
    assert np.array_equal(counts, self.ref_count), "ref counts differ from page tables"
    evictable = set(self._evictable)
    assert evictable == {p for p in range(1, self.num_pages) if self.ref_count[p] == 0}
    assert all(self._page_of_key[k] == p for p, k in self._key_of_page.items())
    assert len(self._page_of_key) == len(self._key_of_page)
