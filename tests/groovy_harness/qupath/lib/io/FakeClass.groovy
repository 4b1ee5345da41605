// Test stand-in for QuPath's PathClass: one instance per name, as QuPath's are.
package qupath.lib.io

class FakeClass {
    static Map cache = [:]
    String name
    static FakeClass of(String name) { cache.computeIfAbsent(name, { new FakeClass(name: it) }) }
    String toString() { name }
}
