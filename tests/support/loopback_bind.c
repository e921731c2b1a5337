/*
 * loopback_bind.c -- LD_PRELOAD shim that keeps test servers on 127.0.0.1.
 *
 * Why this exists: the XRootD server (xrootd 5.x) has no option to choose the
 * address it listens on; it always binds the wildcard address (INADDR_ANY or ::),
 * which would expose the test server on every interface of the machine.  The
 * test suite's rule is that every server binds and talks to loopback only, so
 * tests/servers.py compiles this file into a shared object and starts xrootd
 * with LD_PRELOAD pointing at it.
 *
 * What it does: it wraps bind(2).  When the requested address is a wildcard
 * it is rewritten to loopback before calling the real bind():
 *   - AF_INET  INADDR_ANY -> 127.0.0.1
 *   - AF_INET6 ::      -> ::ffff:127.0.0.1 on a dual-stack socket (so IPv4
 *                         clients connecting to 127.0.0.1 still reach it),
 *                         or ::1 if the socket is IPV6_V6ONLY.
 * The port and every other field are kept; non-wildcard addresses and other
 * address families (AF_UNIX, ...) are passed through untouched.  The caller's
 * sockaddr is never modified (a local copy is rewritten).
 *
 * Build: gcc -shared -fPIC -O2 -o loopback_bind.so loopback_bind.c -ldl
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <netinet/in.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/types.h>

typedef int (*bind_fn)(int, const struct sockaddr *, socklen_t);

static bind_fn real_bind_fn(void)
{
    static bind_fn real = NULL;
    if (real == NULL)
        real = (bind_fn)dlsym(RTLD_NEXT, "bind");
    return real;
}

int bind(int fd, const struct sockaddr *addr, socklen_t len)
{
    bind_fn real = real_bind_fn();
    if (real == NULL) {
        errno = ENOSYS;
        return -1;
    }
    if (addr == NULL)
        return real(fd, addr, len);

    if (addr->sa_family == AF_INET && len >= (socklen_t)sizeof(struct sockaddr_in)) {
        struct sockaddr_in sin;
        memcpy(&sin, addr, sizeof sin);
        if (sin.sin_addr.s_addr == htonl(INADDR_ANY)) {
            sin.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
            return real(fd, (const struct sockaddr *)&sin, sizeof sin);
        }
    } else if (addr->sa_family == AF_INET6 && len >= (socklen_t)sizeof(struct sockaddr_in6)) {
        struct sockaddr_in6 sin6;
        memcpy(&sin6, addr, sizeof sin6);
        if (IN6_IS_ADDR_UNSPECIFIED(&sin6.sin6_addr)) {
            int v6only = 0;
            socklen_t optlen = sizeof v6only;
            if (getsockopt(fd, IPPROTO_IPV6, IPV6_V6ONLY, &v6only, &optlen) != 0)
                v6only = 0;
            if (v6only) {
                sin6.sin6_addr = in6addr_loopback;                 /* ::1 */
            } else {
                memset(&sin6.sin6_addr, 0, sizeof sin6.sin6_addr); /* ::ffff:127.0.0.1 */
                sin6.sin6_addr.s6_addr[10] = 0xff;
                sin6.sin6_addr.s6_addr[11] = 0xff;
                sin6.sin6_addr.s6_addr[12] = 127;
                sin6.sin6_addr.s6_addr[15] = 1;
            }
            return real(fd, (const struct sockaddr *)&sin6, sizeof sin6);
        }
    }
    return real(fd, addr, len);
}
