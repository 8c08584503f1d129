/* kvq_cache_create asks Linux for transparent huge pages on the memory it allocates
   (kvq__advise_huge; KVQ_NO_HUGEPAGES opts out): the 2 MiB pages inside the cache carry the
   advice, which /proc/self/smaps shows as "hg" in the VmFlags of their mapping. The flag is the
   advice itself, so the check does not depend on whether the kernel found free huge pages.
   Skips, saying why, off Linux, without glibc's MADV_HUGEPAGE, or where the kernel has no THP. */
#define _DEFAULT_SOURCE /* glibc: MADV_HUGEPAGE, as a plain `cc` build has */
#define KVQ_IMPLEMENTATION
#include "../kvq.h"
#include "test_util.h"

#if KVQ__HUGEPAGES
/* The VmFlags line of the mapping of /proc/self/smaps that holds address a, or "" */
static void vm_flags(uintptr_t a, char *flags, size_t cap) {
    FILE *f = fopen("/proc/self/smaps", "r");
    char line[512];
    int inside = 0;
    flags[0] = '\0';
    if (!f) return;
    while (fgets(line, sizeof line, f)) {
        unsigned long lo, hi;
        if (sscanf(line, "%lx-%lx ", &lo, &hi) == 2) inside = a >= lo && a < hi;
        else if (inside && !strncmp(line, "VmFlags:", 8)) {
            snprintf(flags, cap, "%s", line + 8);
            break;
        }
    }
    fclose(f);
}

static void test_advice(void) {
    FILE *thp = fopen("/sys/kernel/mm/transparent_hugepage/enabled", "r");
    kvq_config cfg = kvq_default_config(128, 8, 1 << 16); /* about 50 MB */
    kvq_cache *c = NULL;
    char flags[512];
    uintptr_t page;
    if (!thp) {
        printf("test_hugepages: skipped, the kernel has no transparent huge pages\n");
        return;
    }
    fclose(thp);
    CHECK(kvq_cache_create(&c, &cfg) == KVQ_OK, "create");
    if (!c) return;
    page = ((uintptr_t)c->owned + ((uintptr_t)1 << 21) - 1) & ~(((uintptr_t)1 << 21) - 1); /* the first whole one */
    vm_flags(page + 4096, flags, sizeof flags);
    CHECK(strstr(flags, " hg") != NULL, "no huge-page advice on the cache's memory: VmFlags%s", flags);
    printf("cache at %p: VmFlags%s", c->owned, flags);
    kvq_cache_destroy(c);
}
#endif

int main(void) {
#if KVQ__HUGEPAGES
    test_advice();
#else
    printf("test_hugepages: skipped, not Linux with MADV_HUGEPAGE\n");
#endif
    return tu_finish("test_hugepages");
}
