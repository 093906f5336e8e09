# netperf.py: fleet net's link probe (see netperf.rs).
import json, socket, sys, threading, time

BLOCK = bytes(256 * 1024)

def receive_all(conn):
    total, first = 0, None
    while True:
        data = conn.recv(1 << 20)
        if not data:
            break
        if first is None:
            first = time.monotonic()
        total += len(data)
    return total, time.monotonic() - (first or time.monotonic())

def send_for(conn, seconds):
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        conn.sendall(BLOCK)
    conn.shutdown(socket.SHUT_WR)

def receive_report(conn):
    reply = b""
    while True:
        chunk = conn.recv(4096)
        if not chunk:
            return json.loads(reply)
        reply += chunk

def receiving(conn):
    got = []
    thread = threading.Thread(target=lambda: got.append(receive_all(conn)))
    thread.start()
    return thread, got

mode = sys.argv[1]
if mode == "serve":
    port, clients, seconds = int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
    server = socket.create_server(("", port))
    server.settimeout(120)
    print("listening", flush=True)
    for _ in range(clients):
        conn, _ = server.accept()
        with conn:
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            while True:
                byte = conn.recv(1)
                if not byte:
                    break
                conn.sendall(byte)
        conn, _ = server.accept()
        with conn:
            count, spent = receive_all(conn)
            conn.sendall(json.dumps({"bytes": count, "seconds": spent}).encode())
        conn, _ = server.accept()
        with conn:
            send_for(conn, seconds)
        conn, _ = server.accept()
        back, _ = server.accept()
        with conn, back:
            thread, got = receiving(conn)
            send_for(back, seconds)
            thread.join()
            count, spent = got[0]
            conn.sendall(json.dumps({"bytes": count, "seconds": spent}).encode())
else:
    host, port, seconds = sys.argv[2], int(sys.argv[3]), float(sys.argv[4])
    def connect():
        conn = socket.create_connection((host, port), timeout=60)
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return conn
    conn = connect()
    trips = []
    for _ in range(20):
        start = time.monotonic()
        conn.sendall(b"x")
        conn.recv(1)
        trips.append(time.monotonic() - start)
    conn.close()
    conn = connect()
    send_for(conn, seconds)
    sent = receive_report(conn)
    conn.close()
    conn = connect()
    count, spent = receive_all(conn)
    conn.close()
    conn, back = connect(), connect()
    thread, got = receiving(back)
    send_for(conn, seconds)
    thread.join()
    both_sent = receive_report(conn)
    both_count, both_spent = got[0]
    conn.close()
    back.close()
    mbit = lambda count, spent: count * 8 / max(spent, 1e-9) / 1e6
    trips.sort()
    print(json.dumps({
        "rtt_ms": trips[len(trips) // 2] * 1000,
        "up_mbit": mbit(sent["bytes"], sent["seconds"]),
        "down_mbit": mbit(count, spent),
        "both_up_mbit": mbit(both_sent["bytes"], both_sent["seconds"]),
        "both_down_mbit": mbit(both_count, both_spent),
    }))
