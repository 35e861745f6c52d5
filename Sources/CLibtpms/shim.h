#ifndef CLIBTPMS_SHIM_H
#define CLIBTPMS_SHIM_H
#include <stdlib.h>
#include <libtpms/tpm_types.h>
#include <libtpms/tpm_error.h>
#include <libtpms/tpm_library.h>
#include <libtpms/tpm_memory.h>
#include <libtpms/tpm_nvfilename.h>
#include <libtpms/tpm_tis.h>
#endif
