/*
 * pdseg-qupath: import predictions into the project, replacing only earlier pdseg objects.
 *
 * For each image, if <project>/pdseg/predictions/<image name>.geojson exists, this
 *   - removes the image's untouched earlier predictions: annotations whose name starts with "pdseg" and
 *     whose class and outline are still as pdseg wrote them (its "pdseg: fingerprint" measurements);
 *     a prediction you corrected (new class, edited outline) is yours now and stays, as in pdseg itself,
 *   - adds the objects of the file (their names are made to start with "pdseg"),
 *   - adds their classes to the project's class list,
 *   - saves the image data.
 * Your own annotations are never touched. In the file name, each of  / \ : * ? " < > |  in the image name
 * becomes _  (the same rule as pdseg_qupath.core.names.safe_filename).
 *
 * QuPath 0.5 and 0.6 (checked with QuPath 0.6.0 and its bundled Java 21). An image without a predictions
 * file is left alone, with a line saying so.
 *
 * In QuPath: open the project, then Automate > Script editor, open this file and choose
 *   Run > Run for project   (all images; select them all in the dialog), or
 *   Run                     (with no image open: all images; with an image open: that image only).
 * New classes appear in the class list after reopening the project (or Annotations tab >
 * "Populate from existing objects").
 *
 * Headless (once per image; --save also saves each image, which is harmless here):
 *   QuPath script --save -p /path/to/project.qpproj import_predictions.groovy
 * Close the project in the QuPath GUI first, or the GUI may overwrite the result when it saves.
 * Headless runs stop at the first image whose image file is missing (QuPath's own behaviour, before this
 * script runs): fix its path first (Update URIs), or run the script in the GUI, where such an image is
 * reported and skipped.
 */

import qupath.lib.io.PathIO

def PDSEG = "pdseg"

def pdsegFileName(String imageName) {
    // Same characters as pdseg_qupath.core.names.UNSAFE_CHARS; the regex is  [/\\:*?"<>|]
    return imageName.replaceAll('[/\\\\:*?"<>|]', '_') + '.geojson'
}

// Add to the hierarchy: addObjects in QuPath 0.5/0.6, addPathObjects before (0.6 removed it).
def addToHierarchy(hierarchy, objects) {
    try {
        hierarchy.addObjects(objects)
    } catch (MissingMethodException e) {
        hierarchy.addPathObjects(objects)
    }
}

// The rule of pdseg_qupath.core.annotations.label_role: a pdseg object is untouched while its class hash,
// area (within 1 px² + 0.005 px × perimeter) and centroid (within 0.5 px) are as recorded when written.
// Objects without the fingerprint (older pdseg) count as untouched.
def isUntouched(obj) {
    def m
    try {
        m = obj.getMeasurements()  // QuPath >= 0.4: a Map<String, Number>
    } catch (MissingMethodException e) {
        return true
    }
    def fp = m.get("pdseg: fingerprint")
    if (fp == null)
        return true
    def crc = new java.util.zip.CRC32()
    def cls = obj.getPathClass()
    crc.update((cls == null ? "" : cls.toString()).getBytes("UTF-8"))
    if (fp.doubleValue() != (double) (crc.getValue() & 0xFFFFFF))
        return false
    def area = m.get("pdseg: written area px^2"), x = m.get("pdseg: written centroid x px"), y = m.get("pdseg: written centroid y px")
    if (area == null || x == null || y == null)
        return false
    def g = obj.getROI().getGeometry()
    def c = g.getCentroid()
    return Math.abs(g.getArea() - area.doubleValue()) <= 1.0 + 0.005 * g.getLength() &&
            Math.abs(c.getX() - x.doubleValue()) <= 0.5 && Math.abs(c.getY() - y.doubleValue()) <= 0.5
}

// Returns the classes used by the imported objects, or null if the image had no predictions file.
def importOne(entry, imageData, File inDir, String marker) {
    def file = new File(inDir, pdsegFileName(entry.getImageName()))
    if (!file.isFile()) {
        println "pdseg: '${entry.getImageName()}': no predictions file ${file.getName()}; left as it was"
        return null
    }
    def objects = PathIO.readObjects(file)
    for (obj in objects) {
        def name = obj.getName()
        if (name == null || !name.startsWith(marker)) {
            def cls = obj.getPathClass()
            obj.setName(marker + " " + (name ?: (cls == null ? "unclassified" : cls.toString())))
        }
    }
    def hierarchy = imageData.getHierarchy()
    def ours = hierarchy.getAnnotationObjects().findAll { it.getName() != null && it.getName().startsWith(marker) }
    def old = ours.findAll { isUntouched(it) }
    hierarchy.removeObjects(old, true)
    addToHierarchy(hierarchy, objects)
    entry.saveImageData(imageData)
    def kept = ours.size() - old.size()
    println "pdseg: '${entry.getImageName()}': removed ${old.size()} earlier pdseg objects, added ${objects.size()}" +
            (kept ? ", kept ${kept} you corrected" : "")
    return objects.collect { it.getPathClass() }.findAll { it != null }
}

def project = getProject()
if (project == null) {
    println "pdseg: no project is open. Open a QuPath project (or pass -p project.qpproj) and run again."
    return
}
def inDir = new File(project.getPath().getParent().toFile(), "pdseg" + File.separator + "predictions")
if (!inDir.isDirectory()) {
    println "pdseg: no predictions folder ${inDir}; run pdseg-qupath predict first."
    return
}

def usedClasses = []
def current = getCurrentImageData()
def currentEntry = current == null ? null : getProjectEntry()
if (current != null && currentEntry != null) {
    // Run for project / headless batch: called once per image with that image current.
    usedClasses.addAll(importOne(currentEntry, current, inDir, PDSEG) ?: [])
} else {
    for (entry in project.getImageList()) {
        try {
            def imageData = entry.readImageData()
            usedClasses.addAll(importOne(entry, imageData, inDir, PDSEG) ?: [])
        } catch (Exception e) {
            println "pdseg: could not import into '${entry.getImageName()}': ${e.getMessage()}"
        }
    }
}

// Make sure the project's class list knows every predicted class (a new project's list is empty).
def classes = new ArrayList(project.getPathClasses())
def added = usedClasses.unique().findAll { !classes.contains(it) }
if (!added.isEmpty()) {
    classes.addAll(added)
    project.setPathClasses(classes)
    println "pdseg: added classes ${added} to the project"
}
project.syncChanges()
