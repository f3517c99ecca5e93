# posix_io.pxd: the libc calls the workers and the bench load generator share (poll, eventfd,
# vectored I/O), declared once.  Declarations only; nothing to compile.
from posix.uio cimport iovec

cdef extern from "<sys/uio.h>" nogil:
    ssize_t writev(int fd, const iovec *iov, int iovcnt)
    ssize_t preadv(int fd, const iovec *iov, int iovcnt, long offset)
    ssize_t pwritev(int fd, const iovec *iov, int iovcnt, long offset)

cdef extern from "<poll.h>" nogil:
    struct pollfd:
        int fd
        short events
        short revents
    int poll(pollfd *fds, unsigned long nfds, int timeout)
    enum:
        POLLIN
        POLLHUP
        POLLERR
        POLLNVAL
        POLLRDHUP

cdef extern from "<sys/eventfd.h>" nogil:
    int eventfd(unsigned int initval, int flags)
    enum:
        EFD_CLOEXEC
        EFD_NONBLOCK
