#ifndef CFDPASS_H
#define CFDPASS_H
#include <stddef.h>
#include <sys/socket.h>
/* The CMSG_* macros do not import into Swift; these four wrappers keep the ABI arithmetic in the
   system headers. The sendmsg/recvmsg logic itself is Swift (EmulatorBackend). */
static inline size_t cfdpass_cmsg_space(size_t len) { return CMSG_SPACE(len); }
static inline size_t cfdpass_cmsg_len(size_t len) { return CMSG_LEN(len); }
static inline struct cmsghdr *cfdpass_cmsg_firsthdr(struct msghdr *msg) { return CMSG_FIRSTHDR(msg); }
static inline unsigned char *cfdpass_cmsg_data(struct cmsghdr *cmsg) { return CMSG_DATA(cmsg); }
#endif
