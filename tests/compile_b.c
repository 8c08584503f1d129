/* Second translation unit of the compile test: its own static copy of kvq. */
#define KVQ_STATIC
#define KVQ_IMPLEMENTATION
#include "../kvq.h"

int compile_b_run(void);
int compile_b_run(void) {
    kvq_config cfg = kvq_default_config(8, 1, 16);
    return kvq_cache_bytes(&cfg) > 0 && kvq_version_number() == KVQ_VERSION_NUMBER ? 0 : 1;
}
