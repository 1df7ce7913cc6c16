/* A tiny UDP echo tool for the test image (busybox has no UDP client or server).
 *   udp serve PORT            echo every datagram back to its sender, forever
 *   udp send ADDRESS PORT MSG print the reply to MSG; exit 1 if none within 1 s
 * Addresses are numeric (IPv4 or IPv6): a static binary cannot use NSS. */
#include <netdb.h>
#include <stdio.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <unistd.h>

static int serve(const char *port) {
    struct addrinfo hints = {0}, *ai;
    hints.ai_family = AF_INET6;
    hints.ai_socktype = SOCK_DGRAM;
    hints.ai_flags = AI_PASSIVE | AI_NUMERICHOST | AI_NUMERICSERV;
    if (getaddrinfo(NULL, port, &hints, &ai) != 0) return 2;
    int fd = socket(ai->ai_family, SOCK_DGRAM, 0);
    int off = 0;
    setsockopt(fd, IPPROTO_IPV6, IPV6_V6ONLY, &off, sizeof off); /* both families */
    if (fd < 0 || bind(fd, ai->ai_addr, ai->ai_addrlen) != 0) return 2;
    char buf[2048];
    for (;;) {
        struct sockaddr_storage peer;
        socklen_t len = sizeof peer;
        ssize_t n = recvfrom(fd, buf, sizeof buf, 0, (struct sockaddr *)&peer, &len);
        if (n > 0) sendto(fd, buf, (size_t)n, 0, (struct sockaddr *)&peer, len);
    }
}

static int send_one(const char *address, const char *port, const char *msg) {
    struct addrinfo hints = {0}, *ai;
    hints.ai_socktype = SOCK_DGRAM;
    hints.ai_flags = AI_NUMERICHOST | AI_NUMERICSERV;
    if (getaddrinfo(address, port, &hints, &ai) != 0) return 2;
    int fd = socket(ai->ai_family, SOCK_DGRAM, 0);
    struct timeval timeout = {1, 0};
    setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &timeout, sizeof timeout);
    if (fd < 0 || connect(fd, ai->ai_addr, ai->ai_addrlen) != 0) return 2;
    if (send(fd, msg, strlen(msg), 0) < 0) return 1;
    char buf[2048];
    ssize_t n = recv(fd, buf, sizeof buf - 1, 0);
    if (n <= 0) return 1;
    buf[n] = 0;
    printf("%s\n", buf);
    return 0;
}

int main(int argc, char **argv) {
    if (argc == 3 && strcmp(argv[1], "serve") == 0) return serve(argv[2]);
    if (argc == 5 && strcmp(argv[1], "send") == 0) return send_one(argv[2], argv[3], argv[4]);
    fprintf(stderr, "usage: udp serve PORT | udp send ADDRESS PORT MESSAGE\n");
    return 2;
}
