// Test stand-in for a QuPath PathObject: a name, a class, and (optionally) measurements and a box ROI.
package qupath.lib.io

class FakeObject {
    String name
    def pathClass
    Map measurements = [:]
    List box = [0, 0, 10, 10]  // x0, y0, x1, y1

    Map getMeasurements() { measurements }

    def getROI() {
        def (x0, y0, x1, y1) = box
        def geometry = [getArea: { -> (x1 - x0) * (y1 - y0) as double }, getLength: { -> 2.0 * ((x1 - x0) + (y1 - y0)) },
                        getCentroid: { -> [getX: { -> (x0 + x1) / 2.0 }, getY: { -> (y0 + y1) / 2.0 }] }]
        return [getGeometry: { -> geometry }]
    }
}
