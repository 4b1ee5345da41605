// Test stand-in for a QuPath PathObject: a name and a class.
package qupath.lib.io

class FakeObject {
    String name
    def pathClass
}
