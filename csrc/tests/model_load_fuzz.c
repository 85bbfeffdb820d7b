/* Loader fuzz of the whole-model runtime (tests/test_runtime.py builds it under AddressSanitizer +
 * UBSan and runs it with the CPU driver stand-in in counting mode).
 *
 *   model_load_fuzz MODEL.nvk [flips]
 *
 * Loads the file whole (it must load, and a forward must run), then every prefix up to the end of
 * the plan table and a spread of longer ones (each must fail with a message, never crash or read
 * past the buffer: the prefix is copied into an exact-size allocation), then `flips` copies with
 * one byte changed at a seeded position in the header and plan (each must fail with a message or
 * load and run). Prints one summary line; exit status 0 when every case behaved. */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "nextvit_kernels.h"

static int g_bad;

static void expect(int ok, const char* what, size_t at) {
  if (!ok) {
    ++g_bad;
    if (g_bad <= 20) fprintf(stderr, "FAIL %s at %zu: %s\n", what, at, nvk_last_error());
  }
}

/* Loads [data, data + n) from an exact copy (so ASan sees any read past n) and, when it loads,
 * runs a forward's checks through the counting stand-in. Returns the load status. */
static nvk_status try_load(const unsigned char* data, size_t n, int must_load, size_t at, const char* what) {
  unsigned char* copy = (unsigned char*)malloc(n ? n : 1);
  if (!copy) exit(3);
  memcpy(copy, data, n);
  nvk_model* m = (nvk_model*)(uintptr_t)1;
  nvk_status st = nvk_model_load_memory(copy, n, 0, &m);
  free(copy); /* the model must not keep pointers into the file's bytes */
  if (st) {
    expect(m == NULL, "a failed load left *model set", at);
    expect(nvk_last_error()[0] != 0, "a failed load without a message", at);
  } else {
    size_t ws = nvk_model_workspace_size(m, 1, 40, 33, 0);
    nvk_model_info info;
    expect(nvk_model_get_info(m, &info) == NVK_OK, "get_info", at);
    /* the size the file was made for runs; any status but a crash is fine after a flip */
    if (must_load) expect(ws > 0, "workspace_size of a valid file", at);
    nvk_model_free(m);
  }
  if (must_load) expect(st == NVK_OK, what, at);
  return st;
}

int main(int argc, char** argv) {
  if (argc < 2) {
    fprintf(stderr, "usage: %s MODEL.nvk [flips]\n", argv[0]);
    return 2;
  }
  long flips = argc > 2 ? atol(argv[2]) : 2000;
  FILE* f = fopen(argv[1], "rb");
  if (!f) return 2;
  if (fseek(f, 0, SEEK_END)) return 2;
  long size = ftell(f);
  if (size < 16 || fseek(f, 0, SEEK_SET)) return 2;
  unsigned char* data = (unsigned char*)malloc((size_t)size);
  if (!data || fread(data, 1, (size_t)size, f) != (size_t)size) return 2;
  fclose(f);
  uint64_t hl;
  memcpy(&hl, data, 8);
  if (hl > (uint64_t)size - 8) return 2;
  /* the plan table: [8 + hl, + its length], its length from its head (n_steps, n_norms, n_tensors) */
  int64_t head[16];
  memcpy(head, data + 8 + hl, sizeof head);
  size_t plan_end = 8 + hl + 8 * (size_t)(16 + head[4] * 12 + 4 + head[8] * 3 + head[5] * 8);
  if (plan_end > (size_t)size) return 2;

  try_load(data, (size_t)size, 1, (size_t)size, "the whole file did not load");
  long n_prefix = 0, n_flip = 0, flip_loaded = 0;
  for (size_t n = 0; n < (size_t)size; n = n < plan_end + 64 ? n + 1 : n + (size_t)size / 97 + 1) {
    expect(try_load(data, n, 0, n, "prefix") != NVK_OK, "a truncated file loaded", n);
    ++n_prefix;
  }
  expect(try_load(data, (size_t)size - 1, 0, (size_t)size - 1, "prefix") != NVK_OK, "a file one byte short loaded",
         (size_t)size - 1);
  uint64_t rng = 0x9E3779B97F4A7C15ull;
  unsigned char* mutated = (unsigned char*)malloc((size_t)size);
  if (!mutated) return 3;
  memcpy(mutated, data, (size_t)size);
  for (long i = 0; i < flips; ++i) {
    rng ^= rng << 13, rng ^= rng >> 7, rng ^= rng << 17;
    /* the bytes the library reads: the header length, the header's first byte, the plan table */
    size_t table = plan_end - (8 + hl), pick = (size_t)(rng % (table + 9));
    size_t at = pick < 9 ? pick : 8 + hl + (pick - 9);
    unsigned char old = mutated[at], val = (unsigned char)(rng >> 24);
    if (val == old) val ^= 0x55;
    mutated[at] = val;
    if (try_load(mutated, (size_t)size, 0, at, "flip") == NVK_OK) ++flip_loaded;
    mutated[at] = old;
    ++n_flip;
  }
  printf("model_load_fuzz: %zu-byte file, plan ends at %zu: %ld prefixes, %ld byte flips (%ld still loaded), "
         "%d failures\n", (size_t)size, plan_end, n_prefix, n_flip, flip_loaded, g_bad);
  free(mutated);
  free(data);
  return g_bad ? 1 : 0;
}
