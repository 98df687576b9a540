// Debian's libzstd (libzstd-dev): multifd-compression zstd.
#include <zstd.h>
